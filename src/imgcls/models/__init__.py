"""The classifiers a config builds: `torchvision` (any torchvision classifier, the default), `timm`
(timm's, with the `timm` extra) and `pretrained_input` (the input size, mean and std that a timm
model's pretrained weights expect, applied to a run's transforms).

Nothing is imported here: `imgcls.models.torchvision` and `imgcls.models.timm` are found as
attributes of this package first (Hydra's `_target_` lookup and config.targets.locate), so an
`import torchvision` or `import timm` in this file would hide them behind the libraries.
"""

# the model nodes' `_target_`s, as conf/model/resnet18.yaml and conf/model/timm.yaml spell them
TORCHVISION_TARGET = "imgcls.models.torchvision.create_model"
TIMM_TARGET = "imgcls.models.timm.create_model"
