"""`hierax camtrapdp PREDICTIONS --output DIR`: a Camera Trap Data Package (Camtrap DP 1.0) from the
MegaDetector-format JSON that `hierax predict ROOT --detections MD.json --output OUT.json` writes."""

from __future__ import annotations

import argparse

from hierax.errors import HieraxError

COMMAND = "camtrapdp"
HELP = "write a Camtrap DP 1.0 package (deployments, media, observations) from hierax's detection JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", help="the .json that hierax predict --detections wrote")
    parser.add_argument("--output", required=True, help="folder for datapackage.json and the three CSV tables")
    parser.add_argument("--root", help="folder the images are in, for file times (default: the JSON's folder)")
    parser.add_argument("--deployment-id", help="one deployment for every image (default: one per camera folder)")
    parser.add_argument("--latitude", type=float, help="deployment latitude (WGS84), for every deployment")
    parser.add_argument("--longitude", type=float, help="deployment longitude (WGS84), for every deployment")
    parser.add_argument("--coordinate-uncertainty", type=int, metavar="M", help="of the coordinates, in metres")
    parser.add_argument(
        "--deployments",
        metavar="CSV",
        help="deployments table: deploymentID, latitude, longitude, other Camtrap DP columns",
    )
    parser.add_argument(
        "--utc-offset", metavar="+HH:MM", help="time zone of the camera clocks (default: this machine's)"
    )
    parser.add_argument("--event-gap", type=float, metavar="SECONDS", help="gap that starts a new event (as predict)")
    parser.add_argument("--title", help="package and project title")
    parser.add_argument("--contributor", action="append", help="a contributor's name (repeatable)")


def run(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast
    from hierax.interchange.camtrapdp import write_package
    from hierax.interchange.events import parse_utc_offset

    if (args.latitude is None) != (args.longitude is None):
        raise HieraxError("give both --latitude and --longitude")
    package = write_package(
        args.predictions,
        args.output,
        root=args.root,
        deployment_id=args.deployment_id,
        latitude=args.latitude,
        longitude=args.longitude,
        coordinate_uncertainty=args.coordinate_uncertainty,
        deployments=args.deployments,
        utc_offset=parse_utc_offset(args.utc_offset) if args.utc_offset else None,
        event_gap_s=args.event_gap,
        title=args.title,
        contributors=args.contributor,
    )
    print(f"Camtrap DP package: {package} (deployments.csv, media.csv, observations.csv beside it)")
    return 0
