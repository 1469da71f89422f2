"""Adapters for the places people train: the Hugging Face Trainer (`integrations.hf`),
Lightning (`integrations.lightning`) and TensorBoard (`integrations.tensorboard`). Each is
imported on its own; importing `dormant` imports none of them (nor their libraries).
`integrations.session.Session` is what they share: a monitor and a method driven through
the Method API, with the metrics of each epoch."""
