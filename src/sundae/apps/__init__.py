"""Applications over the library: the gradio demo (`sundae demo`) and the quickstart recipes (`sundae quickstart`).

The CLI imports them lazily: gradio is an optional extra.
"""
