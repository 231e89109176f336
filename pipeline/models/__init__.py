"""Models: the CLIP factory, the VGG Gram path and the FreestyleRet prompt model."""


class WeightsError(ValueError):
    """Weights named in the config (model.arch / model.pretrained, extract.vgg_weights) cannot
    be loaded: the message names the file or tag and what to pass instead."""
