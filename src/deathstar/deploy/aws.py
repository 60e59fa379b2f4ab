"""AWS access for the ec2 provider: boto3 clients for one region, and every AWS failure as
an ``Ec2Error`` with a one-line message and the exit code the CLI uses for it.

boto3 is imported lazily (the ``ec2`` extra). A refused call names the IAM action that was
missing (``s3:PutEncryptionConfiguration``, ``ec2:RunInstances``), since that is what the
user has to add to their policy.
"""

from __future__ import annotations

from typing import Any

from deathstar.exitcodes import ExitCode

# Exit codes of the ec2 commands (distinct per failure, as the CLI promises).
EXIT_USAGE = int(ExitCode.USAGE)
EXIT_NO_BOTO3 = int(ExitCode.EC2_NO_BOTO3)
EXIT_NO_CREDENTIALS = int(ExitCode.EC2_NO_CREDENTIALS)
EXIT_NO_DEFAULT_VPC = int(ExitCode.EC2_NO_DEFAULT_VPC)
EXIT_TYPE_NOT_OFFERED = int(ExitCode.EC2_TYPE_NOT_OFFERED)
EXIT_QUOTA = int(ExitCode.EC2_QUOTA)
EXIT_REGION = int(ExitCode.EC2_REGION)
EXIT_NO_ADDRESS = int(ExitCode.EC2_NO_ADDRESS)
EXIT_AWS = int(ExitCode.EC2_AWS)
EXIT_BUNDLE = int(ExitCode.EC2_BUNDLE)
EXIT_NODE_FAILED = int(ExitCode.EC2_NODE_FAILED)

#: The IAM action behind each S3 operation deathstar calls, where its name differs from
#: the operation's (EC2 and SSM actions are named as their operations).
S3_ACTIONS = {
    "HeadBucket": "s3:ListBucket",
    "HeadObject": "s3:GetObject",
    "ListObjectsV2": "s3:ListBucket",
    "PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
    "PutBucketEncryption": "s3:PutEncryptionConfiguration",
    "PutBucketLifecycleConfiguration": "s3:PutLifecycleConfiguration",
    "DeleteObjects": "s3:DeleteObject",
}

_DENIED = ("AccessDenied", "UnauthorizedOperation", "AccessDeniedException",
           "AllAccessDisabled", "InvalidAccessKeyId")


class Ec2Error(Exception):
    """A failure with a one-line explanation and the exit code the CLI uses for it."""

    def __init__(self, message: str, code: int = EXIT_AWS):
        super().__init__(message)
        self.code = code


class Aws:
    """boto3 clients for one region (ec2, ssm, s3, sts), with AWS errors turned into
    ``Ec2Error`` by ``call``."""

    def __init__(self, region: str | None):
        try:
            import boto3
            import botocore.config
            import botocore.exceptions
        except ImportError:
            raise Ec2Error("the ec2 commands need boto3: pip install "
                           "'deathstar-cluster[ec2]'", EXIT_NO_BOTO3) from None
        self.botocore_exceptions = botocore.exceptions
        session = boto3.session.Session(region_name=region)
        self.region: str = session.region_name or ""
        if not self.region:
            raise Ec2Error("no AWS region: pass --region or set AWS_DEFAULT_REGION",
                           EXIT_REGION)
        known = set(session.get_available_regions("ec2"))
        if known and self.region not in known:
            raise Ec2Error(f"unknown AWS region {self.region!r}", EXIT_REGION)
        if session.get_credentials() is None:
            raise Ec2Error("no AWS credentials: configure them (aws configure, "
                           "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance role)",
                           EXIT_NO_CREDENTIALS)
        self.ec2 = session.client("ec2")
        self.ssm = session.client("ssm")
        self.sts = session.client("sts")
        # SigV4 (presigned URLs must say the region), regional endpoint
        self.s3 = session.client("s3", config=botocore.config.Config(
            signature_version="s3v4", s3={"addressing_style": "auto"}))

    def call(self, client: Any, operation: str, **kwargs: Any) -> Any:
        """``client.operation(**kwargs)``; an AWS failure is raised as ``Ec2Error``."""
        try:
            return getattr(client, operation)(**kwargs)
        except self.botocore_exceptions.NoCredentialsError:
            raise Ec2Error("no AWS credentials", EXIT_NO_CREDENTIALS) from None
        except self.botocore_exceptions.ClientError as exc:
            raise translate(exc, client.meta.service_model.service_name) from None
        except self.botocore_exceptions.EndpointConnectionError as exc:
            raise Ec2Error(f"cannot reach AWS in {self.region}: {exc}", EXIT_REGION) from None

    def account(self) -> str:
        """The account id of the credentials in use."""
        return str(self.call(self.sts, "get_caller_identity")["Account"])


def iam_action(service: str, operation: str) -> str:
    """The IAM action a call of ``operation`` on ``service`` needs."""
    if service == "s3":
        return S3_ACTIONS.get(operation, f"s3:{operation}")
    return f"{service}:{operation}"


def translate(exc: Any, service: str = "ec2") -> Ec2Error:
    """A botocore ClientError as a one-line Ec2Error with its exit code."""
    error = exc.response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", "") or exc)
    operation = str(getattr(exc, "operation_name", "") or "")
    if code in ("InstanceLimitExceeded", "VcpuLimitExceeded", "MaxSpotInstanceCountExceeded",
                "InsufficientInstanceCapacity", "RequestLimitExceeded"):
        return Ec2Error(f"AWS capacity or quota: {code}: {message}", EXIT_QUOTA)
    if code in ("Unsupported", "InvalidInstanceType") or "instance type" in message.lower():
        return Ec2Error(f"instance type not available: {code}: {message}",
                        EXIT_TYPE_NOT_OFFERED)
    if code in ("AuthFailure", "UnrecognizedClientException", "InvalidClientTokenId"):
        return Ec2Error(f"AWS refused the credentials: {message}", EXIT_NO_CREDENTIALS)
    if code in _DENIED or (code == "403" and operation.startswith("Head")):
        action = iam_action(service, operation) if operation else f"{service}:?"
        return Ec2Error(f"AWS denied {action} (the {operation} call): add it to your IAM "
                        f"policy ({code}: {message})", EXIT_AWS)
    return Ec2Error(f"AWS error {code}: {message}", EXIT_AWS)
