"""Fake of DCGM's ``dcgm_agent`` module: the same function names and signatures, served by
:mod:`dcgm_fake_engine` instead of libdcgm. Errors are raised as ``dcgm_structs.DCGMError``
subclasses, as the real wrappers do through ``_dcgmCheckReturn``.
"""

from __future__ import annotations

from ctypes import CFUNCTYPE, POINTER, c_int32, c_uint32, c_void_p
from typing import Any

import dcgm_fake_engine
import dcgm_structs

dcgmFieldValueEnumeration_f = CFUNCTYPE(
    c_int32, c_uint32, POINTER(dcgm_structs.c_dcgmFieldValue_v1), c_int32, c_void_p
)
dcgmFieldValueEntityEnumeration_f = CFUNCTYPE(
    c_int32, c_uint32, c_uint32, POINTER(dcgm_structs.c_dcgmFieldValue_v1), c_int32, c_void_p
)


def _engine() -> dcgm_fake_engine.FakeHostEngine:
    engine = dcgm_fake_engine.ENGINE
    if engine is None:
        raise dcgm_structs.DCGMError(dcgm_structs.DCGM_ST_UNINITIALIZED)
    return engine


def dcgmInit() -> int:
    _engine().call("dcgmInit")
    return dcgm_structs.DCGM_ST_OK


def dcgmShutdown() -> int:
    _engine().call("dcgmShutdown")
    return dcgm_structs.DCGM_ST_OK


def dcgmStartEmbedded(opMode: int) -> Any:
    return _engine().start_embedded(opMode)


def dcgmStopEmbedded(dcgm_handle: Any) -> int:
    _engine().disconnect(dcgm_handle)
    return dcgm_structs.DCGM_ST_OK


def dcgmConnect_v2(
    ip_address: str | bytes,
    connectParams: Any,
    version: int = dcgm_structs.c_dcgmConnectV2Params_version,
) -> Any:
    connectParams.version = version
    address = ip_address.decode() if isinstance(ip_address, bytes) else ip_address
    return _engine().connect(address, bool(connectParams.addressIsUnixSocket))


def dcgmDisconnect(dcgm_handle: Any) -> int:
    _engine().disconnect(dcgm_handle)
    return dcgm_structs.DCGM_ST_OK


def dcgmGetAllSupportedDevices(dcgm_handle: Any) -> list[int]:
    return _engine().supported_devices(dcgm_handle)


def dcgmGetDeviceAttributes(
    dcgm_handle: Any, gpuId: int, version: int = dcgm_structs.dcgmDeviceAttributes_version3
) -> Any:
    return _engine().device_attributes(dcgm_handle, gpuId)


def dcgmGetGpuChipArchitecture(dcgm_handle: Any, gpuId: int) -> int:
    return _engine().chip_architecture(dcgm_handle, gpuId)


def dcgmGetGpuInstanceHierarchy(dcgm_handle: Any) -> Any:
    return _engine().instance_hierarchy(dcgm_handle)


def dcgmProfGetSupportedMetricGroups(dcgmHandle: Any, gpuId: int) -> Any:
    return _engine().supported_metric_groups(dcgmHandle, gpuId)


def dcgmGroupCreate(dcgm_handle: Any, type: int, groupName: str | bytes) -> int:
    return _engine().group_create(dcgm_handle, groupName)


def dcgmGroupDestroy(dcgm_handle: Any, group_id: int) -> int:
    _engine().group_destroy(dcgm_handle, group_id)
    return dcgm_structs.DCGM_ST_OK


def dcgmGroupAddEntity(dcgm_handle: Any, group_id: int, entityGroupId: int, entityId: int) -> int:
    _engine().group_add(dcgm_handle, group_id, entityGroupId, entityId)
    return dcgm_structs.DCGM_ST_OK


def dcgmFieldGroupCreate(dcgm_handle: Any, fieldIds: list[int], fieldGroupName: Any) -> int:
    return _engine().field_group_create(dcgm_handle, list(fieldIds), fieldGroupName)


def dcgmFieldGroupDestroy(dcgm_handle: Any, fieldGroupId: int) -> int:
    _engine().field_group_destroy(dcgm_handle, fieldGroupId)
    return dcgm_structs.DCGM_ST_OK


def dcgmWatchFields(
    dcgm_handle: Any,
    groupId: int,
    fieldGroupId: int,
    updateFreq: int,
    maxKeepAge: float,
    maxKeepSamples: int,
) -> int:
    _engine().watch(dcgm_handle, groupId, fieldGroupId, int(updateFreq))
    return dcgm_structs.DCGM_ST_OK


def dcgmUnwatchFields(dcgm_handle: Any, groupId: int, fieldGroupId: int) -> int:
    _engine().unwatch(dcgm_handle, groupId, fieldGroupId)
    return dcgm_structs.DCGM_ST_OK


def dcgmUpdateAllFields(dcgm_handle: Any, waitForUpdate: int) -> int:
    _engine().check(dcgm_handle)
    return dcgm_structs.DCGM_ST_OK


def dcgmGetValuesSince_v2(
    dcgm_handle: Any,
    groupId: int,
    fieldGroupId: int,
    sinceTimestamp: int,
    enumCB: Any,
    userData: Any,
) -> int:
    return _engine().values_since(dcgm_handle, groupId, fieldGroupId, sinceTimestamp, enumCB)
