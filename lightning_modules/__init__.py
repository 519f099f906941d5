"""Lightning modules: diffusion (fine-tune + sample), latent validator, smp segmenter.

Import the submodules directly (``from lightning_modules.segmenter import SegmenterModule``); this
package imports nothing so that loading one module does not pull in the others.
"""
