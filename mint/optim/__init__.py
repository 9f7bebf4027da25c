from mint.optim.losses import dpo_loss, orpo_loss
from mint.optim.module import PreferenceModule

__all__ = ["PreferenceModule", "dpo_loss", "orpo_loss"]
