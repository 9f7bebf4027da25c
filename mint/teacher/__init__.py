"""Teachers: multimodal models whose label rankings the student is aligned on."""

from mint.teacher.crossfit import TeacherModule, TeacherResult, fit_teacher
from mint.teacher.fusion import FusionTeacher, fusion_teacher

__all__ = [
    "FusionTeacher",
    "TeacherModule",
    "TeacherResult",
    "fusion_teacher",
    "fit_teacher",
]
