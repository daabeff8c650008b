"""In-context learning data for IA2: tasks with a demonstration pool, teacher and student prompts."""

from .loading import ICL_SOURCES, load_icl_task, validate_icl
from .prompts import student_prompt, teacher_prompt, teacher_prompts
from .suite import ICL_TASKS, make_icl_task

__all__ = [
    "ICL_SOURCES",
    "ICL_TASKS",
    "load_icl_task",
    "make_icl_task",
    "student_prompt",
    "teacher_prompt",
    "teacher_prompts",
    "validate_icl",
]
