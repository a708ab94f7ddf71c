"""Perception tests load transformers, which imports Triton; the synthetic source renders with
pyrender on Mesa's llvmpipe. Both bring their own LLVM, and loading Triton *after* Mesa's LLVM
segfaults the process (seen here: render a synthetic row, then `import triton`). Importing Triton
first is safe, so do it at collection, before any test renders."""

try:
    import triton  # noqa: F401
except ImportError:  # no Triton, nothing to order
    pass
