"""The fused CPU kernels, by domain: :mod:`.block` (block.cc), :mod:`.optimizer`
(optimizer.cc) and :mod:`.tokenizer` (tokenizer.cc), one Paddle custom-operator extension built
by :mod:`.extension`. Which fast layer or step uses which kernel, and the Paddle operators each
replaces: paddle_cae/fast/README.md."""
