"""Each task's own settings: the `<task>:` section of the config (e.g. `dpo: {beta: 0.1}`), one module here
per task that has settings, named as the task (`dpo.py` for `tasks/dpo.py`).

They sit below `config`, which composes them into `Config` as `cfg.<task>` (one field each, so the type
checker sees `cfg.dpo.beta`), and import nothing of dist_ft but the section base (`config_section`). The task
module itself (`tasks/<task>.py`) imports config for its types and reads its settings in `configure(task,
cfg)`: were the model in the task module, config would import the tasks (torch, the data pipeline) and the
tasks config, a cycle. A test keeps every module here composed into `Config` under its task's name.
"""
