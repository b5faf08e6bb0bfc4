"""Evaluation graphs: a model composed with a perturbation step, so the device builds the copies.

Only the small description of each perturbation (window coordinates, masks, coefficients) crosses
the bus; the perturbed inputs exist only on the device, inside one onnxruntime session.
"""
