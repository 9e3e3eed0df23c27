using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace LoRAHub.Distributed.Mpi;

/// <summary>MPICH's C API (mpi.h of MPICH 4.0: handles are ints; the constants below are its values).</summary>
internal static unsafe partial class MpiNative
{
    public const int Success = 0;
    public const int CommWorld = 0x44000000;
    public const int ErrorsReturn = 0x54000001;
    public const int ThreadMultiple = 3;
    public const int MaxErrorString = 512;
    public static readonly IntPtr InPlace = -1;

    // MPI_Datatype
    public const int Float = 0x4c00040a;
    public const int Double = 0x4c00080b;
    public const int Int8 = 0x4c000137;
    public const int Int32 = 0x4c000439;
    public const int Int64 = 0x4c00083a;
    public const int UInt8 = 0x4c00013b;

    // MPI_Op
    public const int Max = 0x58000001;
    public const int Min = 0x58000002;
    public const int Sum = 0x58000003;
    public const int Prod = 0x58000004;

    /// <summary>The MPI datatype of a tensor element type; null for types MPI lacks (bf16, fp16), which go through fp32.</summary>
    public static int? DataType(ScalarType t) => t switch
    {
        ScalarType.Float32 => Float,
        ScalarType.Float64 => Double,
        ScalarType.Int8 => Int8,
        ScalarType.Int32 => Int32,
        ScalarType.Int64 => Int64,
        ScalarType.Byte or ScalarType.Bool => UInt8,
        _ => null,
    };

    public static int Op(ReduceOp op) => op switch
    {
        ReduceOp.SUM => Sum,
        ReduceOp.PRODUCT => Prod,
        ReduceOp.MIN => Min,
        ReduceOp.MAX => Max,
        _ => throw new ArgumentOutOfRangeException(nameof(op)),
    };

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Initialized")]
    public static partial int Initialized(out int flag);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Init_thread")]
    public static partial int InitThread(IntPtr argc, IntPtr argv, int required, out int provided);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Finalize")]
    public static partial int Finalize();

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Comm_rank")]
    public static partial int CommRank(int comm, out int rank);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Comm_size")]
    public static partial int CommSize(int comm, out int size);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Comm_set_errhandler")]
    public static partial int CommSetErrhandler(int comm, int handler);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Allreduce")]
    public static partial int Allreduce(IntPtr send, IntPtr recv, int count, int type, int op, int comm);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Bcast")]
    public static partial int Bcast(IntPtr buffer, int count, int type, int root, int comm);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Allgather")]
    public static partial int Allgather(IntPtr send, int sendCount, int sendType, IntPtr recv, int recvCount, int recvType, int comm);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Reduce_scatter_block")]
    public static partial int ReduceScatterBlock(IntPtr send, IntPtr recv, int recvCount, int type, int op, int comm);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Barrier")]
    public static partial int Barrier(int comm);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Abort")]
    public static partial int Abort(int comm, int code);

    [LibraryImport(NativeLibraries.Mpi, EntryPoint = "MPI_Error_string")]
    public static partial int ErrorString(int code, byte* text, out int length);

    public static string Describe(int code)
    {
        var buffer = stackalloc byte[MaxErrorString + 1];
        return ErrorString(code, buffer, out var length) == Success ? System.Text.Encoding.ASCII.GetString(buffer, length) : $"MPI error {code}";
    }
}
