"""Where each known dataset comes from, under which terms, and its known biases (from the data folder's READMEs).

Model cards copy these into ``training_data.terms`` and ``limitations``, so a model's caveats travel with it instead
of living only in a README next to data the hospital does not have. Unknown datasets get no entry (``None``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Provenance:
    source: str
    terms: str
    biases: tuple[str, ...]


_MEDMNIST_TERMS = ("MedMNIST v2 (Yang et al., Scientific Data 10:41, 2023), CC BY 4.0; cite MedMNIST v2 and the "
                   "source dataset")
_NIH_TERMS = ("NIH Clinical Center: use unrestricted; link https://nihcc.app.box.com/v/ChestXray-NIHCC, acknowledge "
              "the NIH Clinical Center, cite Wang et al., ChestX-ray8, CVPR 2017")
_NIH_LABELS = ("labels are NLP-mined from radiology reports (NIH Data_Entry_2017_v2020.csv) and noisy; no "
               "radiologist re-read")
_NIH_SAMPLE = "an enriched sample: label rates are not NIH prevalence, so PPV/NPV do not transfer to a clinic"
_COVID_TERMS = ("COVID-19 Radiography Database (Chowdhury et al., IEEE Access 2020; Rahman et al., Comput. Biol. Med. "
                "2021; Kaggle tawsifurrahman/covid19-radiography-database); images from several sources with their "
                "own terms; the GitHub carrier has no LICENSE")
_COVID_NO_IDS = ("no patient ids exist: follow-up images of one patient can fall into different splits, which "
                 "inflates test figures")
_COVID_MIXED_NORMAL = ("the Normal class mixes sources (RSNA images from NIH ChestX-ray14, Kermany pediatric scans) "
                       "while COVID images are adults from other hospitals: a model can learn source, age or "
                       "scanner instead of disease")

DATASETS: dict[str, Provenance] = {
    "pneumoniamnist": Provenance(
        "MedMNIST v2 pneumoniamnist.npz (official file), from Kermany et al. 2018 pediatric chest X-rays",
        _MEDMNIST_TERMS,
        ("pediatric patients (1-5 years, one hospital in Guangzhou): not representative of adults",
         "MedMNIST's test split is the source's validation set, so test accuracy runs below validation accuracy",
         "no patient ids in the file: splits are MedMNIST's own")),
    "breastmnist": Provenance(
        "MedMNIST v2 breastmnist.npz (official file), from Al-Dhabyani et al. 2020 breast ultrasound",
        _MEDMNIST_TERMS,
        ("780 ultrasound images of one institution: very small, wide confidence intervals (test n = 156)",
         "benign and normal are merged into one class")),
    "retinamnist": Provenance(
        "MedMNIST v2 retinamnist.npz (official file), from the DeepDRiD challenge", _MEDMNIST_TERMS,
        ("1,600 fundus images: small",)),
    "covid19_radiography_subset": Provenance(
        "810 images (every 9th COVID, every 25th Normal) of the COVID-19 Radiography Database, 224x224",
        _COVID_TERMS,
        ("810 images: small, wide confidence intervals (test n = 122)", _COVID_MIXED_NORMAL, _COVID_NO_IDS)),
    "covid19_radiography_large": Provenance(
        "6,381 images of the COVID-19 Radiography Database (a superset of covid19_radiography_subset), 224x224 gray",
        _COVID_TERMS,
        ("398 Normal images are pediatric Kermany scans while every COVID image is an adult: report the adult-only "
         "subgroup (card 'audit') beside the whole split",
         _COVID_MIXED_NORMAL,
         _COVID_NO_IDS + "; near-twins (r > 0.99) are grouped by group_id, other follow-ups are not")),
    "kermany_pneumonia_224": Provenance(
        "4,636 pediatric chest X-rays of Kermany et al. 2018 (the source training split only), 224x224 JPEG",
        "Kermany, Zhang, Goldbaum, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, and Kermany et al., Cell 172(5), "
        "2018; the Mendeley record's licence is CC BY 4.0 (as recalled by the data folder, not checked); the GitHub "
        "carrier has no LICENSE",
        ("pediatric patients (1-5 years, one hospital in Guangzhou): not representative of adults",
         "the source's own test set is absent: medhe's patient-grouped split of the training set is used instead",
         "overlaps PneumoniaMNIST's train/val splits (same source) and 398 COVID-19 Radiography Normal images",
         "class imbalance: 1,154 NORMAL vs 3,482 PNEUMONIA")),
    "nih_chestxray14_subset": Provenance(
        "417 NIH ChestX-ray14 images (one per patient), 256x256 gray, resized from 1024x1024",
        _NIH_TERMS,
        (_NIH_LABELS, _NIH_SAMPLE, "417 images for 14 labels: some labels have 13-16 positives in all")),
    "nih_chestxray14_64px": Provenance(
        "1,106 NIH ChestX-ray14 images of 590 patients, 64x64 gray (two public carriers)",
        _NIH_TERMS + "; jrzech/reproduce-chexnet BSD-3-Clause, torchxrayvision Apache-2.0 (label table)",
        (_NIH_LABELS, _NIH_SAMPLE, "64x64 pixels: small findings (nodules, pneumothorax) are barely visible",
         "1,106 images for 14 labels: Pneumonia and Hernia have 23 and 14 positives in all")),
}


def provenance(name: str | None) -> Provenance | None:
    """The entry of a dataset by name (a folder path's last component counts as its name)."""
    if not name:
        return None
    return DATASETS.get(str(name).rstrip("/").rsplit("/", 1)[-1])
