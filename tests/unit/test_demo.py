"""What `ekd demo` runs: the shipped digits experiments, on served teachers and Ray Train."""

from pathlib import Path

from trainer.cli.demo import DEMO_EXPERIMENTS, demo_experiments, service_ready_line

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_every_method_on_served_teachers_through_ray_train(tmp_path):
    experiments = demo_experiments(
        REPO / "configs" / "digits",
        address="127.0.0.1:50051",
        cache_uri="lmdb:///tmp/x",
        workers=2,
        output_dir=tmp_path,
        epochs=3,
    )
    assert len(experiments) == len(DEMO_EXPERIMENTS)
    assert {e.method.name for e in experiments} == {"kd", "student_ensemble", "ekd", "feed", "one", "okd"}
    for cfg in experiments:
        assert cfg.execution.backend == "ray_train" and cfg.execution.workers == 2
        assert cfg.train.epochs == 3 and cfg.output_dir == str(tmp_path)
        if cfg.teachers:
            assert cfg.teacher_source.kind == "served"
            assert (cfg.teacher_source.address, cfg.teacher_source.cache) == (
                "127.0.0.1:50051",
                "lmdb:///tmp/x",
            )
        else:
            assert cfg.method.name in ("one", "okd")
    # Those that distill from the served teachers run first, while the service is warm.
    assert [bool(cfg.teachers) for cfg in experiments] == [True] * 5 + [False] * 2


def test_the_demo_never_prints_the_cache_password():
    line = service_ready_line("127.0.0.1:50051", "redis://:hunter2@127.0.0.1:6379/0")
    assert line == "teacher service ready at 127.0.0.1:50051; cache: redis://:***@127.0.0.1:6379/0"
    assert service_ready_line("127.0.0.1:50051", None).endswith("cache: none")
