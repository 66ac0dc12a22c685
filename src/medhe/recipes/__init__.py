"""Training recipes of the shipped models that ``medhe train`` does not cover: ``medhe recipe NAME [options]``.

Each module has ``build_parser()`` and ``main(argv)`` and records its exact ``medhe recipe ...`` command in the
model card it writes, so every card's ``training.command`` reproduces its model.
"""

#: recipe name -> module under medhe.recipes, with what it trains
RECIPES = {
    "qfcnn": ("qfcnn", "quantization-aware FCNN for TFHE (pneumoniamnist-qfcnn, breastmnist-qfcnn)"),
    "covid": ("covid", "covid-cxr: MobileNetV2-style extractor + linear head for Paillier, and its ensembles"),
    "covid-cv": ("covid_cv", "cross-validated comparison of covid-cxr recipes (model selection on train+val)"),
    "nih-pretrain": ("nih_pretrain", "pretrain the covid-cxr extractor on the NIH ChestX-ray14 subset"),
    "cxr-ckks": ("cxr_ckks", "whole-network CKKS chest X-ray models on the larger folders (covid-cxr-ckks, "
                             "pneumonia-cxr-ckks, cxr14-ckks)"),
    "covid-overlap": ("covid_overlap", "check for images shared between the COVID subset and PneumoniaMNIST"),
}
