"""`ekd sweep`: many experiments over one teacher bank, as Ray Tune trials.

`spec` (what is swept, the trials, validated), `plan` (the sweep made ready before Ray starts), `ray_tune`
(the Ray Tune adapter: the only module here that imports Ray) and `report` (the table, JSON and plot).
"""
