"""De-identification of everything caselens keeps from a DICOM header.

Two layers, both keyed by the collection's secret (``secret.key``, never stored in a table):

* :func:`pseudonym` — HMAC-SHA256 of an identifier: consistent within a collection (so "exclude
  the same patient" works), not reversible without the key, different between collections.
* :func:`deidentify_dataset` — DICOM PS3.15 Annex E *Basic Application Level Confidentiality
  Profile* (CID 7050 code 113100) with the *Retain Longitudinal Temporal Information with
  Modified Dates* option (113107), applied to a copy of a header: private tags removed, the
  attributes of :data:`BASIC_PROFILE` removed (X), emptied (Z) or replaced (D, U); then, as a
  safety net beyond the table, every remaining person name, free-text (LT/ST/UT/UC) value and
  sequence is removed, every remaining instance UID replaced by its pseudonym and every date
  shifted. :func:`kept_metadata` then reads the few columns caselens stores from that copy.

Dates are shifted by a per-patient offset (0-3650 days back, from the patient pseudonym), so
intervals between one patient's studies are kept while the calendar dates are not.
The originals are never modified: callers pass a dataset read from disk, and get a new one.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import hmac
from typing import Any, Sequence

from caselens.errors import PseudonymKeyError

# What is recorded with every DICOM item (provenance "deid") and printed by `caselens scan`.
PROFILE = {
    "standard": "DICOM PS3.15 Annex E",
    "profile": "Basic Application Level Confidentiality Profile",
    "options": ["Retain Longitudinal Temporal Information with Modified Dates"],
    "codes": ["113100", "113107"],  # CID 7050 De-identification Method codes (DeidentificationMethodCodeSequence)
    "pseudonyms": "HMAC-SHA256 under the collection secret",
}
PROFILE_NAME = "PS3.15-E.1-basic+113107"  # short form stored in each item's provenance

# Annex E Table E.1-1, basic-profile actions for the attributes met in imaging headers
# (keyword -> action). X remove, Z empty, D dummy/shifted, U replace UID consistently.
# C (clean) is treated as X: caselens keeps no free text. Anything not in this table and not
# caught by the safety net (names, texts, sequences, UIDs, dates) is kept in the copy, but only
# the attributes of KEPT are ever stored.
BASIC_PROFILE: dict[str, str] = {
    **dict.fromkeys([
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
        "ReferringPhysicianName", "StudyID", "AccessionNumber"], "Z"),
    **dict.fromkeys([
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
        "MediaStorageSOPInstanceUID", "ReferencedSOPInstanceUID", "SynchronizationFrameOfReferenceUID",
        "IrradiationEventUID", "DimensionOrganizationUID", "ConcatenationUID", "StorageMediaFileSetUID",
        "DeviceUID", "InstanceCreatorUID", "ReferencedFrameOfReferenceUID", "TargetUID",
        "UID", "SpecimenUID", "DoseReferenceUID", "FiducialUID", "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID",
        "TransactionUID", "FailedSOPInstanceUIDList", "CreatorVersionUID", "RequestedSOPInstanceUID",
        "StudyInstanceUID", "PresentationDisplayCollectionUID", "PresentationSequenceCollectionUID"], "U"),
    **dict.fromkeys([
        "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
        "AcquisitionDateTime", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
        "InstanceCreationTime"], "D"),
    **dict.fromkeys([
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
        "StationName", "DeviceSerialNumber", "OperatorsName", "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
        "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "OtherPatientIDs",
        "OtherPatientNames", "OtherPatientIDsSequence", "PatientBirthName", "PatientMotherBirthName",
        "PatientAddress", "PatientTelephoneNumbers", "PatientAge", "PatientSize", "PatientWeight",
        "PatientBirthTime", "MilitaryRank", "BranchOfService", "MedicalRecordLocator",
        "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
        "PatientInsurancePlanCodeSequence", "PatientReligiousPreference", "CountryOfResidence",
        "RegionOfResidence", "PregnancyStatus", "SmokingStatus", "MedicalAlerts", "Allergies",
        "StudyDescription", "SeriesDescription", "ImageComments", "StudyComments",
        "RequestedProcedureDescription", "PerformedProcedureStepDescription",
        "PerformedProcedureStepID", "ScheduledProcedureStepDescription", "AdmittingDiagnosesDescription",
        "DerivationDescription", "ProtocolName", "AcquisitionComments", "TextComments",
        "ContentCreatorName", "RequestAttributesSequence", "ReferencedStudySequence",
        "ReferencedPatientSequence", "ReferencedImageSequence", "SourceImageSequence",
        "ReferencedPerformedProcedureStepSequence", "ProcedureCodeSequence",
        "AdmissionID", "IssuerOfAdmissionID", "ServiceEpisodeID", "ServiceEpisodeDescription",
        "VisitComments", "CurrentPatientLocation", "PatientInstitutionResidence",
        "PersonName", "VerifyingObserverName", "VerifyingOrganization", "ScheduledPerformingPhysicianName",
        "PerformingPhysicianIdentificationSequence", "OperatorIdentificationSequence",
        "DetectorID", "GantryID", "PlateID", "CassetteID", "GeneratorID", "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest", "RequestedProcedureID", "ResponsiblePerson",
        "ResponsibleOrganization", "ModifiedAttributesSequence", "OriginalAttributesSequence",
        "DigitalSignaturesSequence", "ReferencedRequestSequence", "FrameComments",
        "PatientState", "SpecialNeeds", "Manufacturer", "ManufacturerModelName",
        "DeviceSerialNumber", "SoftwareVersions"], "X"),
}
# Text value representations removed by the safety net (free text can hold anything).
_FREE_TEXT_VRS = {"LT", "ST", "UT", "UC"}
# UIDs that name a *kind* of thing, not an instance: kept as they are.
_CLASS_UIDS = {"SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID", "ReferencedSOPClassUID",
               "ImplementationClassUID", "CodingSchemeUID", "ContextUID", "MappingResource UID"}
_DATE_SHIFT_MAX_DAYS = 3650

# Columns caselens stores from a de-identified header: keyword -> column name.
KEPT: dict[str, str] = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "ViewPosition": "view_position",
    "StudyDate": "study_date",  # shifted per patient
    "SeriesNumber": "series_number",
    "BurnedInAnnotation": "burned_in_annotation",
}


def check_key(secret: bytes) -> bytes:
    """``secret`` when it can key pseudonyms; :class:`PseudonymKeyError` for an empty or short key
    (an HMAC under an empty key is reversible for short ids by trying them all)."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise PseudonymKeyError("pseudonyms need the collection's own key (Collection.secret()); an empty or "
                              "short key is refused: ingest through caselens.open(...).ingest or `caselens ingest`")
    return bytes(secret)


def pseudonym(value: str, secret: bytes, kind: str) -> str:
    """Pseudonym of ``value``; ``kind`` is "patient" (``pt-…``), "uid" (a valid ``2.25.…`` UID) or
    "path" (``path-…``: an input file's relative path, see :mod:`caselens.ingest.source_paths`).
    ``secret`` is the collection's key (:func:`check_key`)."""
    if kind == "path":  # paths are taken as they are: a leading or trailing space is part of the name
        mac = hmac.new(check_key(secret), f"path:{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        return f"path-{mac[:10].hex()}"
    mac = hmac.new(check_key(secret), f"{kind}:{value.strip()}".encode(), hashlib.sha256).digest()
    if kind == "uid":
        return "2.25." + str(int.from_bytes(mac[:16], "big"))
    return f"pt-{mac[:8].hex()}"


def date_shift_days(patient_id: str, secret: bytes) -> int:
    """Days by which this patient's dates move back: stable per patient, 0..3650."""
    mac = hmac.new(check_key(secret), f"dateshift:{patient_id.strip()}".encode(), hashlib.sha256).digest()
    return int.from_bytes(mac[:4], "big") % (_DATE_SHIFT_MAX_DAYS + 1)


def shift_date(value: str, days: int) -> str:
    """``YYYYMMDD`` (or a DT starting with it) moved ``days`` back; "" when it is not a date."""
    text = str(value).strip()
    try:
        day = _dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    return (day - _dt.timedelta(days=days)).strftime("%Y%m%d")


def deidentify_dataset(ds: Any, secret: bytes, keywords: Sequence[str] | None = None) -> Any:
    """A de-identified copy of a pydicom header (``ds`` itself is not modified; pixel data is
    dropped from the copy). See the module docstring for what is done. With ``keywords``, only
    those attributes are copied (and de-identified the same way), without the file meta."""
    from pydicom.dataset import Dataset

    out = Dataset()
    if keywords is None:
        elems = [e for e in ds if e.tag.group != 0x7FE0]  # pixel data: not part of a header copy
    else:
        elems = [ds[k] for k in keywords if k in ds]
    for elem in elems:
        out.add(copy.deepcopy(elem))
    meta = getattr(ds, "file_meta", None) if keywords is None else None
    patient = str(ds.get("PatientID", "") or "").strip()
    days = date_shift_days(patient, secret)
    _clean(out, secret, days)
    if meta is not None:
        clean_meta = copy.deepcopy(meta)
        _clean(clean_meta, secret, days)
        out.file_meta = clean_meta
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "PS3.15 E.1 basic; modified dates (113100, 113107)"  # LO: 64 chars at most
    return out


def _clean(ds: Any, secret: bytes, days: int) -> None:
    ds.remove_private_tags()
    for elem in list(ds):
        keyword = elem.keyword
        action = BASIC_PROFILE.get(keyword)
        vr = elem.VR
        if action == "X" or (action is None and (vr in _FREE_TEXT_VRS or vr == "SQ" or vr == "PN")):
            del ds[elem.tag]
        elif action == "Z" or (action is None and vr == "PN"):
            elem.value = ""
        elif action == "D" or (action is None and vr in ("DA", "DT")):
            if vr in ("DA", "DT") and elem.value:
                elem.value = shift_date(str(elem.value), days)
            elif vr != "TM":
                elem.value = ""
        elif action == "U" or (vr == "UI" and keyword not in _CLASS_UIDS):
            values = elem.value if elem.VM > 1 else [elem.value]
            new = [pseudonym(str(v), secret, "uid") for v in values if str(v).strip()]
            elem.value = new if elem.VM > 1 else (new[0] if new else "")
        elif vr in ("LO", "SH") and keyword.endswith(("ID", "Number", "Name")) and keyword not in KEPT:
            # identifiers and names of other kinds (IDs, numbers, names) outside the table
            del ds[elem.tag]


def kept_metadata(ds: Any, secret: bytes) -> dict[str, Any]:
    """The de-identified metadata caselens stores for one DICOM header.

    Columns: modality, body_part, view_position, study_date (shifted), series_number,
    burned_in_annotation, and the pseudonyms patient_id (``pt-…``), study_uid, series_uid and
    instance_uid (``2.25.…``). The input's identifiers never leave this function in clear.
    """
    clean = deidentify_dataset(ds, secret, [*KEPT, "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    out: dict[str, Any] = {}
    for keyword, column in KEPT.items():
        value = clean.get(keyword)
        text = str(value).strip() if value is not None else ""
        out[column] = text or None
    if out.get("series_number") is not None:
        try:
            out["series_number"] = float(out["series_number"])
        except ValueError:
            out["series_number"] = None
    patient = str(ds.get("PatientID", "") or "").strip()
    out["patient_id"] = pseudonym(patient, secret, "patient") if patient else None
    out["study_uid"] = str(clean.get("StudyInstanceUID", "") or "") or None
    out["series_uid"] = str(clean.get("SeriesInstanceUID", "") or "") or None
    out["instance_uid"] = str(clean.get("SOPInstanceUID", "") or "") or None
    return out
