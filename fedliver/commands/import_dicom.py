"""`fedliver import-dicom DICOM_DIR OUT --site A --phase-map phases.json`: DICOM MR series to LiQA layout.

Finds every DICOM series under DICOM_DIR (subfolders included), names its phase from its
SeriesDescription by the phase map (phase -> regexes; phases tried in the file's order, the first
match wins; deploy/phases.json is an example for common GE, Siemens and Philips names), groups
series into cases by study and writes OUT/Vendor_<site>/<NNNN>-<site>/<PHASE>.nii.gz. Case ids
carry no patient identifier; OUT/import_dicom_mapping.json (mode 0600) maps them back to the
patient and study and names the series used, and keeps ids stable when the import is run again.
Each series not imported (no phase matched, missing slices or uneven spacing, multi-frame, two
series for one phase in a study, unreadable) is one line with the reason. Exit status: 0 when
something was imported (or already was), 1 when no series could be, 2 for a bad phase map, site
name, DICOM_DIR or mapping file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-dicom",
        help="import DICOM MR series into the LiQA layout (phase by SeriesDescription, de-identified case ids)",
        description=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("dicom_dir", type=Path, metavar="DICOM_DIR", help="folder searched for DICOM series")
    parser.add_argument("out", type=Path, metavar="OUT", help="LiQA root written (OUT/Vendor_<site>/...)")
    parser.add_argument("--site", required=True, help="the site's center name, letters and digits (e.g. A)")
    parser.add_argument("--phase-map", type=Path, required=True, metavar="JSON",
                        help='phase -> regexes on SeriesDescription, e.g. {"GED4": ["(?i)hbp|20 ?min"]}; '
                             "see deploy/phases.json")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from client.dicom_import import DicomImportConfig, DicomImportError, PhaseMapError, import_dicom, read_phase_map

    try:
        config = DicomImportConfig(site=args.site, phase_map=read_phase_map(args.phase_map))
        result = import_dicom(args.dicom_dir, args.out, config)
    except (PhaseMapError, DicomImportError) as e:
        print(e, file=sys.stderr)
        return 2
    print(result.format())
    return 0 if result.imported else 1
