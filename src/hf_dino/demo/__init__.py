"""The interactive demo: the Gradio app (`app`: attention maps, masks and nearest neighbours of an
uploaded image) and its Hugging Face Space (`space`)."""
