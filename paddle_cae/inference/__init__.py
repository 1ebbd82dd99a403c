"""Prediction on images: preprocessing, top-k, reconstructions and export (predict), and
Paddle Inference predictors for exported models (predictor)."""
