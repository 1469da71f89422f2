"""Adapters for the places people train: the Hugging Face Trainer (`integrations.hf`),
Lightning (`integrations.lightning`) and TensorBoard (`integrations.tensorboard`). Each is
imported on its own; importing `dormant` imports none of them (nor their libraries). What they
share is `dormant.session.Session`: the monitor, the epoch-end measurement and a method driven
through the Method API, the same object the built-in Trainer drives."""
