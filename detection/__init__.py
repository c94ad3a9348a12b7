"""The detection training program every backend runs: ``detection.train.main(config, env)``.

Never imports ``orchestrator``. Importing this package does not import torch (only the
submodules that train do), so the config schema in :mod:`detection.config` stays light.
"""
