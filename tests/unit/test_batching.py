"""The teacher deployment's batching logic without Ray: a real small engine, or a fake forward that tags
each output row with the sample it came from."""

import asyncio

import pytest
import torch

from services.serve.batching import PendingRequest, forward_batch, infer_in_pieces, sample_count
from services.teachers.engine import InputSpecError, TeacherEngine, UnknownOutputError
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher

SIZE = 16


@pytest.fixture(scope="module")
def engine() -> TeacherEngine:
    torch.manual_seed(0)
    return TeacherEngine(create_teacher("cifar_resnet20", 10, preprocessing=Preprocessing.cifar(SIZE)))


def engine_forward(engine: TeacherEngine):
    async def forward(images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        return await asyncio.to_thread(engine.infer, images, outputs)

    return forward


class FakeForward:
    """Answers each output with one row per sample: the sample's first pixel, plus 1000 for "b"; records the
    (dtype, shape, outputs) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.dtype, tuple[int, ...], list[str]]] = []

    async def __call__(self, images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        self.calls.append((images.dtype, tuple(images.shape), list(outputs)))
        first_pixels = images[:, 0, 0, 0].double()
        return {name: first_pixels + (1000 if name == "b" else 0) for name in outputs}


def tagged(first: int, count: int, size: int = SIZE, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """`count` images whose first pixels are first, first + 1, ..."""
    images = torch.zeros(count, 3, size, size, dtype=dtype)
    images[:, 0, 0, 0] = torch.arange(first, first + count, dtype=dtype)
    return images


def random_images(seed: int, count: int, size: int = SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)


def test_sample_count_counts_samples_not_requests():
    requests = [PendingRequest(tagged(0, 3), ("a",)), PendingRequest(tagged(0, 5), ("a",))]
    assert sample_count(requests) == 8
    assert sample_count([]) == 0


def test_requests_share_a_forward_only_with_same_dtype_and_sample_shape():
    forward = FakeForward()
    requests = [
        PendingRequest(tagged(0, 2), ("a",)),
        PendingRequest(tagged(10, 1, size=20), ("a",)),
        PendingRequest(tagged(20, 3), ("a",)),
        PendingRequest(tagged(30, 2, dtype=torch.float32), ("a",)),
        PendingRequest(tagged(40, 1, size=20), ("a",)),
    ]
    results = asyncio.run(forward_batch(requests, forward))

    assert sorted(forward.calls, key=str) == sorted(
        [
            (torch.uint8, (5, 3, SIZE, SIZE), ["a"]),
            (torch.uint8, (2, 3, 20, 20), ["a"]),
            (torch.float32, (2, 3, SIZE, SIZE), ["a"]),
        ],
        key=str,
    )
    # Each request gets its own rows back, in request order whatever the grouping.
    assert [result["a"].tolist() for result in results] == [
        [0, 1],
        [10],
        [20, 21, 22],
        [30, 31],
        [40],
    ]


def test_one_forward_over_the_union_of_outputs_each_request_gets_only_its_own():
    forward = FakeForward()
    requests = [
        PendingRequest(tagged(0, 2), ("a",)),
        PendingRequest(tagged(10, 1), ("b", "a")),
        PendingRequest(tagged(20, 2), ("b",)),
    ]
    results = asyncio.run(forward_batch(requests, forward))

    assert forward.calls == [(torch.uint8, (5, 3, SIZE, SIZE), ["a", "b"])]
    assert [list(result) for result in results] == [["a"], ["b", "a"], ["b"]]
    assert results[0]["a"].tolist() == [0, 1]
    assert results[1]["a"].tolist() == [10] and results[1]["b"].tolist() == [1010]
    assert results[2]["b"].tolist() == [1020, 1021]


def test_merged_forward_with_a_real_engine_matches_forwarding_each_request_alone(engine):
    requests = [
        PendingRequest(random_images(1, 2), ("logits",)),
        PendingRequest(random_images(2, 3), ("layer1", "logits")),
        PendingRequest(random_images(3, 1), ("layer3",)),
    ]
    calls_before = engine.calls
    results = asyncio.run(forward_batch(requests, engine_forward(engine)))

    assert engine.calls == calls_before + 1
    for request, result in zip(requests, results):
        assert list(result) == list(request.outputs)
        alone = engine.infer(request.images, list(request.outputs))
        for name in request.outputs:
            assert result[name].shape == alone[name].shape
            torch.testing.assert_close(result[name], alone[name], rtol=1e-4, atol=1e-4)


def test_split_results_do_not_share_the_batch_storage():
    requests = [PendingRequest(tagged(0, 2), ("a",)), PendingRequest(tagged(10, 2), ("a",))]
    first, second = asyncio.run(forward_batch(requests, FakeForward()))
    assert first["a"].untyped_storage().data_ptr() != second["a"].untyped_storage().data_ptr()
    assert first["a"].untyped_storage().nbytes() == first["a"].nbytes


def test_a_request_the_engine_rejects_fails_alone(engine):
    requests = [
        PendingRequest(random_images(1, 2), ("logits",)),
        PendingRequest(random_images(2, 1), ("logits", "no_such_output")),
        PendingRequest(random_images(3, 3), ("layer2",)),
        PendingRequest(random_images(4, 2).float(), ("logits",)),
    ]
    results = asyncio.run(forward_batch(requests, engine_forward(engine)))

    assert isinstance(results[1], UnknownOutputError)
    assert "no_such_output" in str(results[1])
    assert isinstance(results[3], InputSpecError)
    for index in (0, 2):
        request, result = requests[index], results[index]
        assert not isinstance(result, Exception)
        alone = engine.infer(request.images, list(request.outputs))
        assert list(result) == list(request.outputs)
        for name in request.outputs:
            torch.testing.assert_close(result[name], alone[name], rtol=1e-4, atol=1e-4)


def test_errors_other_than_a_rejected_input_fail_the_whole_batch():
    async def broken(images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        raise RuntimeError("device lost")

    requests = [PendingRequest(tagged(0, 1), ("a",)), PendingRequest(tagged(1, 1), ("a",))]
    with pytest.raises(RuntimeError, match="device lost"):
        asyncio.run(forward_batch(requests, broken))


def one_request_batches(forward, submitted: list[PendingRequest]):
    """A batch queue that forwards each submitted request on its own, remembering it."""

    async def submit(request: PendingRequest):
        submitted.append(request)
        (result,) = await forward_batch([request], forward)
        return result

    return submit


def test_a_request_larger_than_max_batch_size_is_split_and_joined_back_in_order():
    submitted: list[PendingRequest] = []
    result = asyncio.run(
        infer_in_pieces(tagged(0, 10), ["a", "b"], 4, one_request_batches(FakeForward(), submitted))
    )

    assert [request.images.shape[0] for request in submitted] == [4, 4, 2]
    assert all(request.outputs == ("a", "b") for request in submitted)
    assert list(result) == ["a", "b"]
    assert result["a"].tolist() == list(range(10))
    assert result["b"].tolist() == [1000 + i for i in range(10)]


def test_split_request_with_a_real_engine_equals_one_forward(engine):
    images = random_images(5, 7)
    submitted: list[PendingRequest] = []
    result = asyncio.run(
        infer_in_pieces(
            images, ["logits", "layer3"], 3, one_request_batches(engine_forward(engine), submitted)
        )
    )

    assert [request.images.shape[0] for request in submitted] == [3, 3, 1]
    whole = engine.infer(images, ["logits", "layer3"])
    assert list(result) == ["logits", "layer3"]
    for name in whole:
        torch.testing.assert_close(result[name], whole[name], rtol=1e-4, atol=1e-4)


def test_a_request_within_max_batch_size_is_submitted_whole():
    submitted: list[PendingRequest] = []
    result = asyncio.run(
        infer_in_pieces(tagged(0, 4), ["a"], 4, one_request_batches(FakeForward(), submitted))
    )
    assert len(submitted) == 1
    assert result["a"].tolist() == [0, 1, 2, 3]


def test_a_bare_output_name_is_one_output():
    submitted: list[PendingRequest] = []
    result = asyncio.run(infer_in_pieces(tagged(0, 2), "b", 4, one_request_batches(FakeForward(), submitted)))
    assert submitted[0].outputs == ("b",)
    assert list(result) == ["b"]


def test_a_failed_piece_fails_the_request(engine):
    with pytest.raises(UnknownOutputError, match="no_such_output"):
        asyncio.run(
            infer_in_pieces(
                random_images(1, 5), ["no_such_output"], 2, one_request_batches(engine_forward(engine), [])
            )
        )


@pytest.mark.parametrize(
    ("images", "described"),
    [
        (torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), f"[3, {SIZE}, {SIZE}]"),
        (torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8), f"[0, 3, {SIZE}, {SIZE}]"),
        ([[0, 1], [2, 3]], "list"),
    ],
)
def test_images_that_are_not_a_nonempty_batch_are_rejected_before_submitting(images, described):
    submitted: list[PendingRequest] = []
    with pytest.raises(InputSpecError) as raised:
        asyncio.run(infer_in_pieces(images, ["a"], 4, one_request_batches(FakeForward(), submitted)))
    assert str(raised.value) == f"expected a uint8 image batch [B, C, H, W] with B >= 1, got {described}"
    assert submitted == []
