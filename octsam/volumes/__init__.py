"""OCT volumes: vendor and DICOM files in, per-eye biomarker volumes (mm³), en-face maps and reports out.

from octsam.volumes import read_volume, segment_volume, write_volume_outputs
volumes = read_volume("scan.vol")                 # list: an E2E file may hold several
result = segment_volume(segmenter, volumes[0])    # per-B-scan masks + VolumeMeasures
write_volume_outputs(result, "out")               # masks, report PNG + JSON, a row in out/volumes.csv
"""

from octsam.volumes.volume import AnnotatedVolume, OctVolume, parse_spacing

__all__ = ["AnnotatedVolume", "OctVolume", "parse_spacing", "read_volume", "read_annotated_volume"]


def __getattr__(name):  # readers import eyepy/pydicom/SimpleITK lazily
    if name in ("read_volume", "read_annotated_volume", "is_volume_input"):
        from octsam.volumes import readers

        return getattr(readers, name)
    if name in ("segment_volume", "write_volume_outputs", "VolumeResult"):
        from octsam.volumes import segment

        return getattr(segment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
