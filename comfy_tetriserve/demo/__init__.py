"""``comfy-tetriserve demo``: the scheduler service on four CPU workers, end to end.

assets.py builds the tiny FLUX and SD3 checkpoints and measures their step times on the workers
(both cached under ``config.home_dir()/demo``); workload.py turns the measured profile into a
seeded mixed workload with deadlines; replay.py runs ``comfy-tetriserve serve`` once per policy
and replays the workload through the HTTP API from several concurrent clients; report.py prints
the outcomes and draws the board; command.py is the command.
"""
