using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoRAHub.Distributed.Nccl;

/// <summary>NCCL's C API (nccl.h, 2.x): communicators, collectives on device pointers, asynchronous errors, abort.</summary>
internal static unsafe partial class NcclNative
{
    public const int UniqueIdBytes = 128;

    [StructLayout(LayoutKind.Sequential)]
    public struct UniqueId
    {
        public fixed byte Internal[UniqueIdBytes];
    }

    // ncclResult_t
    public const int Success = 0;
    public const int InProgress = 7;

    // ncclRedOp_t
    public static int Op(ReduceOp op) => op switch
    {
        ReduceOp.SUM => 0,
        ReduceOp.PRODUCT => 1,
        ReduceOp.MAX => 2,
        ReduceOp.MIN => 3,
        _ => throw new ArgumentOutOfRangeException(nameof(op)),
    };

    // ncclDataType_t
    public static int DataType(ScalarType t) => t switch
    {
        ScalarType.Int8 => 0,
        ScalarType.Byte or ScalarType.Bool => 1,
        ScalarType.Int32 => 2,
        ScalarType.Int64 => 4,
        ScalarType.Float16 => 6,
        ScalarType.Float32 => 7,
        ScalarType.Float64 => 8,
        ScalarType.BFloat16 => 9,
        _ => throw new ArgumentException($"NCCL has no element type for {t}"),
    };

    public static string ResultName(int r) => r switch
    {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError (a peer failed or went away)",
        7 => "ncclInProgress",
        _ => $"ncclResult {r}",
    };

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclGetVersion")]
    public static partial int GetVersion(out int version);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclGetUniqueId")]
    public static partial int GetUniqueId(out UniqueId id);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclCommInitRank")]
    public static partial int CommInitRank(out IntPtr comm, int nranks, UniqueId id, int rank);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclCommDestroy")]
    public static partial int CommDestroy(IntPtr comm);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclCommAbort")]
    public static partial int CommAbort(IntPtr comm);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclCommGetAsyncError")]
    public static partial int CommGetAsyncError(IntPtr comm, out int asyncError);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclGetErrorString")]
    public static partial IntPtr GetErrorString(int result);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclAllReduce")]
    public static partial int AllReduce(IntPtr send, IntPtr recv, nuint count, int type, int op, IntPtr comm, IntPtr stream);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclBroadcast")]
    public static partial int Broadcast(IntPtr send, IntPtr recv, nuint count, int type, int root, IntPtr comm, IntPtr stream);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclAllGather")]
    public static partial int AllGather(IntPtr send, IntPtr recv, nuint sendCount, int type, IntPtr comm, IntPtr stream);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclReduceScatter")]
    public static partial int ReduceScatter(IntPtr send, IntPtr recv, nuint recvCount, int type, int op, IntPtr comm, IntPtr stream);

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclGroupStart")]
    public static partial int GroupStart();

    [LibraryImport(NativeLibraries.Nccl, EntryPoint = "ncclGroupEnd")]
    public static partial int GroupEnd();

    public static string Describe(int r) =>
        $"{ResultName(r)}: {Marshal.PtrToStringAnsi(GetErrorString(r)) ?? ""}";
}
