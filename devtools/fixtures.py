"""Tiny datasets in the official layouts, written from synthetic phantoms: for tests,
benchmarks and trying the loaders without downloading anything.

Each ``make_*`` writes ``n`` images into ``root`` in the layout the matching dataset class reads
and returns ``root``. DICOM files carry fake identifying values (:data:`FAKE_PHI`) so tests can
check that none of them leaks into anything the library writes.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from spcl_fast.data.synthetic import SyntheticCXR

# Fake identifying header values: must never appear in caches, reports, logs or anything else
# the library writes. Names, ids, dates, institution, free text, and the text annotations a
# file with burned-in text carries (BurnedInAnnotation "YES" is set alongside them).
FAKE_PHI = {
    "PatientName": "DOE^JANE^PHI",
    "PatientID": "PHI-ID-7731",
    "PatientBirthDate": "19410203",
    "StudyDate": "20190405",
    "AccessionNumber": "PHIACC99812",
    "InstitutionName": "PHI GENERAL HOSPITAL",
    "InstitutionAddress": "12 PHI STREET, PHITOWN",
    "ReferringPhysicianName": "HOUSE^GREGORY^PHI",
    "OperatorsName": "TECH^PHI^OPERATOR",
    "OtherPatientIDs": "PHI-MRN-004417",
    "StudyDescription": "CHEST PA FOR PHI-KNOWN PATIENT",
    "ImageComments": "Free text: Jane Doe PHI, bed 12, MRN 004417",
    "PatientComments": "PHI allergy note",
    "DerivationDescription": "PHI burned-in label: DOE JANE 1941",
}


def phantoms(n: int, size: int, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """``n`` synthetic radiographs as uint8 ``(n, size, size)`` (rendered at <= 256, resized),
    with Gaussian noise of ``noise`` grey levels (detector noise: makes large PNGs compress
    like real films)."""
    render = min(size, 256)
    imgs = SyntheticCXR("train", num_images=max(n, 1), image_size=max(render, 32),
                        seed=seed).images(0, n)[:, 0].numpy()
    out = np.empty((n, size, size), np.uint8)
    for k in range(n):
        im = Image.fromarray(np.rint(imgs[k] * 255).astype(np.uint8))
        out[k] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
    if noise:
        grain = np.random.default_rng(seed).normal(0.0, noise, out.shape)
        out = np.clip(out + grain, 0, 255).astype(np.uint8)
    return out


def write_dicom(path, arr: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, signed: bool = False,
                transfer_syntax: str | None = None, window: tuple | None = None,
                rescale: tuple | None = None, voi_lut: tuple | None = None,
                voi_function: str | None = None, phi: bool = True,
                instance_uid: str | None = None, **encode_kwargs) -> str:
    """Write ``arr`` (uint8/uint16/int16 ``(H, W)``, or ``(H, W, 3)`` uint8 RGB) as a DICOM file.

    ``window=(center, width)``, ``rescale=(slope, intercept)``, ``voi_lut=(first_mapped,
    bits, values)`` add those modules; ``transfer_syntax`` compresses through pydicom's encoders
    (RLE, JPEG-LS, JPEG 2000), through Pillow for JPEG Baseline, or re-encodes (implicit VR,
    deflated). ``phi`` fills
    :data:`FAKE_PHI`. ``instance_uid`` is the SOP Instance UID (default: a new random one;
    give one for byte-identical files).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEGBaseline8Bit,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    arr = np.asarray(arr)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = instance_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if phi:
        for key, value in FAKE_PHI.items():
            setattr(ds, key, value)
        ds.BurnedInAnnotation = "YES"
    bits = bits_stored or arr.dtype.itemsize * 8
    ds.set_pixel_data(arr, photometric, bits, generate_instance_uid=False)  # keep ours
    if signed:
        ds.PixelRepresentation = 1
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        first, lut_bits, values = voi_lut
        item = Dataset()
        values = [int(v) for v in values]
        item.add_new("LUTDescriptor", "US", [len(values), first, lut_bits])
        item.add_new("LUTData", "US", values)  # ambiguous VR (US or OW): say which
        ds.VOILUTSequence = Sequence([item])
    if transfer_syntax == JPEGBaseline8Bit:
        import io

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        if arr.ndim == 3:
            ds.PhotometricInterpretation = "YBR_FULL_422"
    elif transfer_syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = transfer_syntax  # dcmwrite re-encodes (and deflates)
    elif transfer_syntax is not None and transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False, **encode_kwargs)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def make_chestxray14(root, n: int = 24, size: int = 32, seed: int = 0,
                     noise: float = 0.0) -> str:
    """NIH layout: images/, Data_Entry_2017.csv (2017 quirks: trailing empty column, ages like
    060Y, bracketed headers), train_val_list.txt, test_list.txt (patients 3 apart)."""
    from spcl_fast.data.chestxray14 import CLASS_NAMES

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    imgs = phantoms(n, size, seed, noise)
    rng = np.random.default_rng(seed)
    rows, train_val, test = [], [], []
    for k in range(n):
        patient, follow = k // 3 + 1, k % 3
        name = f"{patient:08d}_{follow:03d}.png"
        Image.fromarray(imgs[k]).save(os.path.join(root, "images", name))
        found = [c for c in CLASS_NAMES if rng.random() < 0.15]
        findings = "|".join(found) if found else "No Finding"
        rows.append(f"{name},{findings},{follow},{patient},{50 + k:03d}Y,M,PA,"
                    f"2500,2048,0.168,0.168,")
        (test if patient % 4 == 0 else train_val).append(name)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    with open(os.path.join(root, "Data_Entry_2017.csv"), "w") as f:
        f.write("\n".join([header, *rows]) + "\n")
    for fname, names in (("train_val_list.txt", train_val), ("test_list.txt", test)):
        with open(os.path.join(root, fname), "w") as f:
            f.write("\n".join(names) + "\n")
    return os.fspath(root)


def make_chexpert(root, n_train: int = 16, n_valid: int = 4, size: int = 32,
                  seed: int = 0) -> str:
    """CheXpert-v1.0-small layout: train.csv, valid.csv, train/patientNNNNN/studyK/viewV_*.jpg;
    every third image is a lateral view; labels draw 1.0, 0.0, -1.0 and blank."""
    from spcl_fast.data.chexpert import ALL_CLASSES

    imgs = phantoms(n_train + n_valid, size, seed)
    rng = np.random.default_rng(seed)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *ALL_CLASSES]
    for part, start, count in (("train", 0, n_train), ("valid", n_train, n_valid)):
        lines = [",".join(header)]
        for k in range(start, start + count):
            patient = 1 + k // 2 if part == "train" else 64541 + k
            lateral = k % 3 == 2
            rel = (f"{part}/patient{patient:05d}/study1/view{k % 2 + 1}_"
                   f"{'lateral' if lateral else 'frontal'}.jpg")
            dest = os.path.join(root, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            # Portrait films, as in the release (320 x 390 in the small version).
            h = size + size // 4
            im = Image.fromarray(imgs[k]).resize((size, h))
            im.save(dest, quality=95)
            values = ["1.0", "0.0", "-1.0", ""] if part == "train" else ["1.0", "0.0"]
            labels = [values[int(rng.integers(len(values)))] for _ in ALL_CLASSES]
            lines.append(",".join([f"CheXpert-v1.0-small/{rel}", "Female", "68",
                                   "Lateral" if lateral else "Frontal",
                                   "" if lateral else "AP", *labels]))
        with open(os.path.join(root, f"{part}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return os.fspath(root)


def make_rsna(root, n: int = 20, size: int = 32, seed: int = 0) -> str:
    """RSNA layout: stage_2_train_labels.csv (several rows per positive) +
    stage_2_train_images/<patientId>.dcm (8-bit MONOCHROME2, fake PHI in the headers)."""
    import uuid

    imgs = phantoms(n, size, seed)
    rng = np.random.default_rng(seed)
    lines = ["patientId,x,y,width,height,Target"]
    for k in range(n):
        pid = str(uuid.UUID(int=int(rng.integers(1 << 62)) * 7 + k))
        write_dicom(os.path.join(root, "stage_2_train_images", f"{pid}.dcm"), imgs[k])
        if k % 3 == 0:
            for b in range(1 + k % 2):
                x, y = 2 + 4 * b, 3 + 2 * b
                lines.append(f"{pid},{x}.0,{y}.0,{size // 4}.0,{size // 3}.0,1")
        else:
            lines.append(f"{pid},,,,,0")
    with open(os.path.join(root, "stage_2_train_labels.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.fspath(root)


def make_siim(root, n: int = 12, size: int = 32, seed: int = 0, fmt: str = "relative",
              transfer_syntax: str | None = None) -> str:
    """SIIM layout: train-rle.csv (``ImageId, EncodedPixels``) + dicom-images-train/<study>/
    <series>/<ImageId>.dcm (``transfer_syntax``: the release uses JPEG Baseline). Every other
    image has a pneumothorax given as two RLE rows (two rectangles) in ``fmt``; the true masks
    are in ``root/masks.npy`` (n, size, size)."""
    from pydicom.uid import generate_uid

    from spcl_fast.data.siim import rle_encode

    imgs = phantoms(n, size, seed)
    masks = np.zeros((n, size, size), np.uint8)
    lines = ["ImageId, EncodedPixels"]
    for k in range(n):
        image_id, study, series = generate_uid(), generate_uid(), generate_uid()
        write_dicom(os.path.join(root, "dicom-images-train", study, series, f"{image_id}.dcm"),
                    imgs[k], transfer_syntax=transfer_syntax)
        if k % 2:
            parts = [np.zeros((size, size), np.uint8) for _ in range(2)]
            parts[0][2:2 + size // 3, 3:3 + size // 5] = 1
            parts[1][size // 2:size // 2 + 4, size - 8:size - 2] = 1
            for part in parts:
                masks[k] |= part
                lines.append(f"{image_id}, {rle_encode(part, fmt)}")
        else:
            lines.append(f"{image_id}, -1")
    with open(os.path.join(root, "train-rle.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    np.save(os.path.join(root, "masks.npy"), masks)
    return os.fspath(root)
