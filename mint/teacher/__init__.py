"""Teachers: multimodal models whose label rankings the student is aligned on."""

from mint.teacher.fusion import FusionTeacher, fusion_teacher
from mint.teacher.stage import TeacherModule, TeacherResult, run_teacher_stage
from mint.teacher.text_encoder import TextEncoder, embed_frozen

__all__ = [
    "FusionTeacher",
    "TeacherModule",
    "TeacherResult",
    "TextEncoder",
    "embed_frozen",
    "fusion_teacher",
    "run_teacher_stage",
]
