"""MEND (Mitchell et al., ICLR 2022) as a second editor, for side-by-side evaluation with Transformer-Patcher.

- nets.py:   the gradient transform (running normalisation, residual low-rank MLP, step sizes)
- stack.py:  which matrices are edited, gradient capture, the top layers run on cached inputs
- data.py:   training examples (disjoint from every evaluation split), captured once
- train.py:  `patchd mend train` (first-order MEND training, checkpointed, resumable)
- store.py:  the editor on disk (safetensors + JSON config)
- editor.py: `patchd evaluate --editor mend` (edits in place; what the gate would have said)

See ../shared/MEND-NOTES.md for the algorithm and the original code's known bugs.
"""
