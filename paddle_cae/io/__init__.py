"""Reading and writing weights files, without torch and without running code from the files.

* :mod:`.weights` -- :func:`read_weights`, the one reader: decides the format from the content
  (PyTorch zip or legacy ``torch.save``, ``.pd``/``.pdparams`` pickles, numpy ``.npz``) and
  returns numpy arrays in plain containers; :func:`select_state_dict` picks the weights out.
* :mod:`.torch_pickle` -- the restricted unpickler for ``torch.save`` files and pickled modules.
* :mod:`.pd` -- the safe pickle reader shared by both, and this package's atomic ``.pd`` writer.
"""
from .pd import CheckpointError, CheckpointWriteError, link_checkpoint, save_checkpoint, to_plain, unwrap_paddle_tensors
from .torch_pickle import TorchModuleStub, module_state_dict
from .weights import (
    FORMATS,
    detect_format,
    load_checkpoint,
    read_torch_checkpoint,
    read_torch_module_state,
    read_weights,
    read_weights_with_format,
    select_state_dict,
)

__all__ = ["CheckpointError", "CheckpointWriteError", "FORMATS", "TorchModuleStub", "detect_format", "link_checkpoint",
           "load_checkpoint", "module_state_dict", "read_torch_checkpoint", "read_torch_module_state",
           "read_weights", "read_weights_with_format", "save_checkpoint", "select_state_dict", "to_plain",
           "unwrap_paddle_tensors"]
