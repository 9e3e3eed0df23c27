using System.Globalization;

namespace LoRAHub.Distributed;

/// <summary>
/// Where this process sits in a distributed run, read from torchrun's environment contract (RANK, WORLD_SIZE,
/// LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or, under MPICH's mpiexec, from PMI_RANK / PMI_SIZE.
/// </summary>
public sealed record DistributedEnvironment(int Rank, int WorldSize, int LocalRank, int LocalWorldSize, string MasterAddr, int MasterPort)
{
    public const string DefaultMasterAddr = "127.0.0.1";
    public const int DefaultMasterPort = 29500;

    /// <summary>The single-process run: rank 0 of 1.</summary>
    public static DistributedEnvironment Single { get; } = new(0, 1, 0, 1, DefaultMasterAddr, DefaultMasterPort);

    public bool IsDistributed => WorldSize > 1;

    /// <summary>Reads the variables; a single process when none is set. Inconsistent values are an error naming them.</summary>
    public static DistributedEnvironment FromEnvironment(Func<string, string?>? read = null)
    {
        read ??= Environment.GetEnvironmentVariable;
        var world = Int(read, "WORLD_SIZE") ?? Int(read, "PMI_SIZE") ?? 1;
        // Under mpiexec our launcher passes RANK_OFFSET (first rank of this node) so that PMI's node-local numbering
        // becomes the global rank; plain mpiexec across hosts numbers ranks globally already.
        var rank = Int(read, "RANK") ?? (Int(read, "PMI_RANK") is int pmi ? pmi + (Int(read, "LORAHUB_RANK_OFFSET") ?? 0) : 0);
        var localWorld = Int(read, "LOCAL_WORLD_SIZE") ?? Int(read, "MPI_LOCALNRANKS") ?? world;
        var localRank = Int(read, "LOCAL_RANK") ?? Int(read, "MPI_LOCALRANKID") ?? (read("PMI_RANK") != null ? Int(read, "PMI_RANK")!.Value : rank);
        var addr = read("MASTER_ADDR") is { Length: > 0 } a ? a : DefaultMasterAddr;
        var port = Int(read, "MASTER_PORT") ?? DefaultMasterPort;
        if (world < 1) throw new DistributedException($"WORLD_SIZE must be at least 1 (got {world})");
        if (rank < 0 || rank >= world) throw new DistributedException($"RANK {rank} is outside 0..{world - 1} (WORLD_SIZE {world})");
        if (localRank < 0 || localRank >= Math.Max(localWorld, 1))
            throw new DistributedException($"LOCAL_RANK {localRank} is outside 0..{localWorld - 1} (LOCAL_WORLD_SIZE {localWorld})");
        if (port is <= 0 or > 65535) throw new DistributedException($"MASTER_PORT {port} is not a TCP port");
        return new DistributedEnvironment(rank, world, localRank, localWorld, addr, port);
    }

    private static int? Int(Func<string, string?> read, string name)
    {
        var text = read(name);
        if (string.IsNullOrWhiteSpace(text)) return null;
        if (!int.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out var value))
            throw new DistributedException($"environment variable {name}='{text}' is not an integer");
        return value;
    }
}
