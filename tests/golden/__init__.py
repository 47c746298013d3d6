"""Golden references: independent transcriptions of the authors' released code, for the golden tests.

Each module here is written from the authors' repositories at the versions they pin (the facts are cited in each
docstring), without importing embedkit, so that a golden test compares embedkit with something it does not share
code with. Only what the authors' own code also takes from a library is taken from it here (torch's layers,
PIL's resampling, OpenAI's BPE vocabulary as open_clip ships it).

- :mod:`golden.openai_clip`: openai/CLIP ``clip/model.py`` (``build_model``, the ViT, the text transformer),
  ``clip/clip.py`` (``_transform``, ``tokenize``) and the zero-shot rule of its ImageNet notebook.
- :mod:`golden.chexzero`: rajpurkarlab/CheXzero ``data_process.py`` (the 320 px HDF5 images) and
  ``zero_shot.py`` (the test-time transform and the positive/negative softmax); their model is OpenAI's CLIP.
- :mod:`golden.biomedclip`: BiomedCLIP's authors' code is open_clip itself (its hub card); the zero-shot rule of
  the model card's example.
"""
