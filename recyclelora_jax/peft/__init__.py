"""Parameter-efficient fine-tuning on a backbone parameter tree: adapter inits (``init``) and
attaching/merging adapters by rule (``params``); the adapted layer itself is a model part
(``models.adapters``)."""
