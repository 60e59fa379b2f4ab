"""The bundle bucket: one S3 bucket per account and region that deathstar owns, through
which EC2 nodes get the node bundle and hand back their public key.

The bucket is ``deathstar-<account>-<region>``, so any ``ec2 up`` of that account in that
region finds it again (and it is reused across clusters). Each ``up`` (re)asserts its
settings: tagged ``deathstar:managed``, every public access blocked, objects encrypted at
rest (SSE-S3), and a lifecycle rule that expires bundles (and forgotten cluster records).

Layout:

- ``bundles/<sha256>.tar``: a node bundle, named by its content hash (shared by clusters);
- ``clusters/NAME/bundle``: the key of the bundle cluster NAME booted from;
- ``clusters/NAME/nodes/LAUNCH-SLOT``: what node SLOT of launch LAUNCH reported, written by
  the node itself through a presigned PUT: ``ready <public key>`` or ``failed <reason>``.

Nodes hold no AWS credentials: the user-data carries presigned URLs (a GET of the bundle, a
PUT of the node's own report) that expire within the hour.
"""

from __future__ import annotations

from dataclasses import dataclass

from deathstar._version import __version__
from deathstar.deploy.aws import Aws, Ec2Error
from deathstar.deploy.bundle import Bundle
from deathstar.deploy.provider import check_name

#: Seconds a presigned URL stays valid: a node must have booted by then.
URL_EXPIRY_S = 3600
#: Days after which S3 deletes a bundle (a later ``up`` uploads it again if needed).
BUNDLE_EXPIRY_DAYS = 7
#: Days after which S3 deletes the records of a cluster that was never taken down.
CLUSTER_RECORD_EXPIRY_DAYS = 30
TAG_MANAGED = "deathstar:managed"
_SSE = "AES256"


@dataclass(frozen=True)
class NodeReport:
    """What a node said about its boot: ``state`` is "ready" (with its CurveZMQ public
    key, z85) or "failed" (with the reason)."""

    state: str
    detail: str

    @classmethod
    def parse(cls, body: bytes) -> NodeReport:
        """A report from its object's body; anything malformed is a failure saying so."""
        text = body[:4096].decode("utf-8", "replace").strip()
        state, _, detail = text.partition(" ")
        if state == "ready" and len(detail) == 40 and detail.isprintable():
            return cls("ready", detail)
        if state == "failed":
            return cls("failed", detail or "no reason given")
        return cls("failed", f"unreadable node report {text[:80]!r}")


class BundleBucket:
    """The account's bundle bucket in ``aws``'s region."""

    def __init__(self, aws: Aws):
        self.aws = aws
        self.s3 = aws.s3
        self.name = f"deathstar-{aws.account()}-{aws.region}"

    # --- the bucket ---------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the bucket when missing, then assert its settings (idempotent)."""
        aws, bucket = self.aws, self.name
        try:
            aws.call(self.s3, "head_bucket", Bucket=bucket)
        except Ec2Error as exc:
            if "404" not in str(exc) and "NoSuchBucket" not in str(exc) \
                    and "Not Found" not in str(exc):
                raise
            where = {} if aws.region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": aws.region}}
            aws.call(self.s3, "create_bucket", Bucket=bucket, ACL="private", **where)
        aws.call(self.s3, "put_public_access_block", Bucket=bucket,
                 PublicAccessBlockConfiguration={
                     "BlockPublicAcls": True, "IgnorePublicAcls": True,
                     "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
        aws.call(self.s3, "put_bucket_encryption", Bucket=bucket,
                 ServerSideEncryptionConfiguration={"Rules": [
                     {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": _SSE}}]})
        aws.call(self.s3, "put_bucket_lifecycle_configuration", Bucket=bucket,
                 LifecycleConfiguration={"Rules": [
                     {"ID": "deathstar-expire-bundles", "Status": "Enabled",
                      "Filter": {"Prefix": "bundles/"},
                      "Expiration": {"Days": BUNDLE_EXPIRY_DAYS}},
                     {"ID": "deathstar-expire-cluster-records", "Status": "Enabled",
                      "Filter": {"Prefix": "clusters/"},
                      "Expiration": {"Days": CLUSTER_RECORD_EXPIRY_DAYS}}]})
        aws.call(self.s3, "put_bucket_tagging", Bucket=bucket, Tagging={"TagSet": [
            {"Key": TAG_MANAGED, "Value": "true"},
            {"Key": "deathstar:version", "Value": __version__}]})

    # --- bundles ------------------------------------------------------------------------

    @staticmethod
    def bundle_key(bundle: Bundle) -> str:
        return f"bundles/{bundle.sha256}.tar"

    def upload(self, bundle: Bundle, cluster: str) -> str:
        """Put ``bundle``'s archive in the bucket (unless an intact copy is there) and
        record that ``cluster`` uses it. Returns its key."""
        key = self.bundle_key(bundle)
        try:
            head = self.aws.call(self.s3, "head_object", Bucket=self.name, Key=key)
            present = head.get("Metadata", {}).get("archive-sha256") == bundle.archive_sha256
        except Ec2Error as exc:
            if "404" not in str(exc) and "Not Found" not in str(exc):
                raise
            present = False
        if not present:
            with bundle.archive.open("rb") as fh:
                self.aws.call(self.s3, "put_object", Bucket=self.name, Key=key, Body=fh,
                              ServerSideEncryption=_SSE,
                              Metadata={"archive-sha256": bundle.archive_sha256})
        self.aws.call(self.s3, "put_object", Bucket=self.name,
                      Key=f"clusters/{check_name(cluster)}/bundle", Body=key.encode(),
                      ServerSideEncryption=_SSE)
        return key

    def download_url(self, key: str) -> str:
        """A GET of ``key`` that anyone holding the URL may make, for URL_EXPIRY_S."""
        return str(self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=URL_EXPIRY_S))

    # --- node reports -------------------------------------------------------------------

    @staticmethod
    def report_key(cluster: str, launch: str, slot: int) -> str:
        return f"clusters/{check_name(cluster)}/nodes/{launch}-{slot}"

    def report_url(self, cluster: str, launch: str, slot: int) -> str:
        """A PUT of that node's report (no other object), for URL_EXPIRY_S."""
        return str(self.s3.generate_presigned_url(
            "put_object", Params={"Bucket": self.name,
                                  "Key": self.report_key(cluster, launch, slot)},
            ExpiresIn=URL_EXPIRY_S))

    def reports(self, cluster: str) -> dict[str, NodeReport]:
        """``LAUNCH-SLOT`` -> the report of every node of ``cluster`` that sent one."""
        prefix = f"clusters/{check_name(cluster)}/nodes/"
        found = {}
        for key in self._keys(prefix):
            body = self.aws.call(self.s3, "get_object", Bucket=self.name, Key=key)["Body"]
            found[key[len(prefix):]] = NodeReport.parse(body.read(4096))
        return found

    # --- forgetting ---------------------------------------------------------------------

    def forget(self, cluster: str) -> list[str]:
        """Delete ``cluster``'s records and the bundle it used unless another cluster's
        record names it. Returns the keys deleted; a missing bucket is nothing to do."""
        prefix = f"clusters/{check_name(cluster)}/"
        try:
            mine = self._keys(prefix)
        except Ec2Error as exc:
            if "NoSuchBucket" in str(exc):
                return []
            raise
        used = self._read(f"{prefix}bundle") if f"{prefix}bundle" in mine else None
        doomed = list(mine)
        if used is not None and used.startswith("bundles/"):
            others = {self._read(k) for k in self._keys("clusters/")
                      if k.endswith("/bundle") and not k.startswith(prefix)}
            if used not in others:
                doomed.append(used)
        for start in range(0, len(doomed), 1000):
            self.aws.call(self.s3, "delete_objects", Bucket=self.name, Delete={
                "Objects": [{"Key": k} for k in doomed[start:start + 1000]], "Quiet": True})
        return doomed

    def _keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self.aws.call(self.s3, "list_objects_v2", Bucket=self.name, Prefix=prefix,
                                 **token)
            keys += [str(o["Key"]) for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _read(self, key: str) -> str:
        body = self.aws.call(self.s3, "get_object", Bucket=self.name, Key=key)["Body"]
        return str(body.read(1024).decode("utf-8", "replace").strip())
