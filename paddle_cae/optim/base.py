"""A small dygraph optimizer base with PyTorch's group semantics.

Each group is a dict with ``params`` and its own hyper-parameters; ``lr`` is the group's
absolute learning rate, ``lr_scale * base lr`` (the layer-decay factor, 1.0 by default; a
Paddle-style ``learning_rate`` multiplier is read as ``lr_scale`` when no ``lr_scale`` is
given). Per-parameter state lives in ``state[i]`` for the i-th parameter in group order, and
:meth:`state_dict` saves it by that position, not by Paddle's global tensor names, so a resumed
run may build its layers in any order.

``_param_groups`` / ``_parameter_list`` mirror Paddle's attribute names so that
``paddle.amp.GradScaler`` can unscale the gradients before :meth:`step`.
"""
import numpy as np
import paddle


class GroupOptimizer:
    is_group_optimizer = True
    #: names of the per-parameter tensors kept in ``state``
    state_tensors = ()
    #: the optimizer named in a saved state (None: the class name); a subclass that keeps its
    #: parent's state sets the parent's name, so that either one resumes from the other
    state_name = None

    def __init__(self, params, lr, defaults):
        self.defaults = dict(defaults)
        self._base_lr = float(lr)
        self.param_groups = []
        self.state = {}
        groups = _as_groups(params)
        if not groups:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        for group in groups:
            self.add_param_group(group)

    # ------------------------------------------------------------------ groups
    @property
    def _param_groups(self):
        return self.param_groups

    @property
    def _parameter_list(self):
        return [p for g in self.param_groups for p in g["params"]]

    def add_param_group(self, group):
        group = dict(group)
        params = group["params"]
        if isinstance(params, paddle.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("parameters must be given in an ordered collection, not a set")
        group["params"] = list(params)
        if "lr_scale" not in group:
            group["lr_scale"] = float(group.get("learning_rate", 1.0))
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        group["lr"] = self._base_lr * group["lr_scale"]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in group["params"]):
            raise ValueError("a parameter appears in more than one parameter group")
        self.param_groups.append(group)

    def set_lr(self, lr):
        """Set the base lr; each group gets ``lr * lr_scale``."""
        self._base_lr = float(lr)
        for group in self.param_groups:
            group["lr"] = self._base_lr * group["lr_scale"]

    def get_lr(self):
        return self._base_lr

    def _indexed_params(self):
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, group, p
                i += 1

    # ------------------------------------------------------------------ steps
    def clear_grad(self, set_to_zero=False):
        """Drop the gradients (``set_to_zero=True`` keeps zero-filled ones instead). A parameter
        without a gradient is skipped by :meth:`step`, as in PyTorch."""
        for p in self._parameter_list:
            p.clear_gradient(set_to_zero)

    @paddle.no_grad()
    def step(self):
        for i, group, p in self._indexed_params():
            if p.stop_gradient:
                continue
            grad = p.grad
            if grad is None:
                continue
            self._update(p, grad, group, self.state.setdefault(i, {}))

    def _update(self, param, grad, group, state):
        raise NotImplementedError

    # ------------------------------------------------------------- save/load
    def state_dict(self):
        state = {}
        for i, entries in self.state.items():
            state[i] = {k: (v.numpy().copy() if isinstance(v, paddle.Tensor) else v)
                        for k, v in entries.items()}
        groups = []
        index = 0
        for group in self.param_groups:
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(saved)
        return {"optimizer": self._state_name(), "base_lr": self._base_lr,
                "state": state, "param_groups": groups}

    def _state_name(self):
        return self.state_name or type(self).__name__

    def set_state_dict(self, state_dict):
        """Restore moments and group hyper-parameters. The groups must have the sizes of the
        saved ones; every saved tensor must match its parameter's shape."""
        kind = state_dict.get("optimizer")
        if kind is not None and kind != self._state_name():
            raise ValueError(f"optimizer state is for {kind}, this optimizer is {self._state_name()}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for k, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"parameter group {k} ({group.get('group_name', '')}) has "
                                 f"{len(group['params'])} parameters, the saved one "
                                 f"{len(saved['params'])}")
        params = self._parameter_list
        new_state = {}
        for key, entries in state_dict["state"].items():
            i = int(key)
            if not 0 <= i < len(params):
                raise ValueError(f"optimizer state names parameter {i}, there are {len(params)}")
            p = params[i]
            restored = {}
            for name, value in entries.items():
                if name in self.state_tensors:
                    arr = np.asarray(value.numpy() if isinstance(value, paddle.Tensor) else value)
                    if list(arr.shape) != list(p.shape):
                        raise ValueError(f"optimizer state {name!r} of parameter {i} has shape "
                                         f"{list(arr.shape)}, the parameter {list(p.shape)}")
                    restored[name] = paddle.to_tensor(arr, dtype=p.dtype)
                else:
                    restored[name] = value
            new_state[i] = restored
        self.state = new_state
        for saved, group in zip(saved_groups, self.param_groups):
            for k, v in saved.items():
                if k not in ("params", "param_names"):
                    group[k] = v
        if "base_lr" in state_dict:
            self._base_lr = float(state_dict["base_lr"])


def _as_groups(params):
    params = list(params)
    if params and isinstance(params[0], dict):
        return params
    return [{"params": params}] if params else []
