"""Preference optimisation: the losses, the forward that feeds them, the LightningModule, DPO's reference."""
