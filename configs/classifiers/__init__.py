"""Noise-conditional classifiers p(y | x_t) for class-conditional sampling (launch.py train_classifier)."""
