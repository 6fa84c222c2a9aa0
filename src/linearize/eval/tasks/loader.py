"""lm-eval's ``custom_dataset`` hook for the tasks in this folder (data read from local files)."""

from linearize.eval.tasks import read_task_data


def load_dataset(task: str, data_dir: str | None = None, **unused):
    """lm-eval passes the task's ``dataset_kwargs`` and the run's ``metadata`` (ignored here)."""
    return read_task_data(task, data_dir)
