"""The custom `transformers` model for configurations no native class computes (loaded with trust_remote_code).

lm/hub/export.py copies these files, with lm/model.py and the modules it imports, beside the weights, rewriting
`from lm.<module> import` as relative imports, so an export runs the very code that trained it.
"""
