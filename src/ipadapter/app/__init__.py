"""The local web app : a page for image prompting, over the same request path as `ipadapter generate`.

limits: what an upload may be; masks: a drawn or uploaded mask made into one the CLI reads; command: the
`ipadapter generate` line that reproduces a result; service: the model, loaded once, serving one request at a
time; ui: the Gradio page (the only module that imports gradio).
"""
