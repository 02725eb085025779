"""The dock widget's panels, one small class per file; ``napari_hdmil._widget`` assembles them.

inputs (slide, model, mpp, LIPN, top-k, the run buttons) · progress · prediction · heatmap ·
gallery · export · similar slides (SLPD). ``LayerStore`` keeps the layers they put in the viewer.
"""
