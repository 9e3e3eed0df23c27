namespace LoRAHub.Distributed.Launch;

/// <summary>
/// torchrun's launch arguments: ranks per node, nodes, this node's index, and where rank 0 serves the rendezvous store.
/// <see cref="Backend"/> "nccl" starts one process per rank directly; "mpi" starts them through MPICH's mpiexec.
/// </summary>
public sealed record LaunchOptions
{
    public required int NprocPerNode { get; init; }
    public int Nnodes { get; init; } = 1;
    public int NodeRank { get; init; }
    public string MasterAddr { get; init; } = DistributedEnvironment.DefaultMasterAddr;
    public int MasterPort { get; init; } = DistributedEnvironment.DefaultMasterPort;
    public required string Backend { get; init; }
    /// <summary>
    /// How long the other ranks get to end on their own after one failed (so their own error, e.g. a watchdog naming
    /// the silent rank, is printed), before they are killed. LORAHUB_KILL_GRACE (seconds) sets the default; 5 s.
    /// </summary>
    public TimeSpan KillGrace { get; init; } = DefaultKillGrace();

    public static TimeSpan DefaultKillGrace() =>
        double.TryParse(System.Environment.GetEnvironmentVariable("LORAHUB_KILL_GRACE"), System.Globalization.NumberStyles.Float,
            System.Globalization.CultureInfo.InvariantCulture, out var s) && s >= 0 ? TimeSpan.FromSeconds(s) : TimeSpan.FromSeconds(5);

    public int WorldSize => NprocPerNode * Nnodes;

    /// <exception cref="ArgumentException">A value out of range, or a combination the backend cannot run.</exception>
    public void Validate()
    {
        if (NprocPerNode < 1) throw new ArgumentException($"--nproc-per-node must be at least 1 (got {NprocPerNode})");
        if (Nnodes < 1) throw new ArgumentException($"--nnodes must be at least 1 (got {Nnodes})");
        if (NodeRank < 0 || NodeRank >= Nnodes) throw new ArgumentException($"--node-rank must be in 0..{Nnodes - 1} (got {NodeRank})");
        if (MasterPort is <= 0 or > 65535) throw new ArgumentException($"--master-port {MasterPort} is not a TCP port");
        if (Backend is not ("nccl" or "mpi")) throw new ArgumentException($"unknown backend '{Backend}' (nccl or mpi)");
        if (Backend == "mpi" && Nnodes > 1)
            throw new ArgumentException("the CPU (mpi) backend spans machines through MPICH itself: run `mpiexec -hosts h1,h2 -n N dotnet loraHub run script.csx` " +
                "(ranks come from PMI_RANK/PMI_SIZE) instead of --nnodes");
        if (Backend == "nccl" && OperatingSystem.IsWindows())
            throw new ArgumentException("NCCL does not exist on Windows: train on one GPU there (leave out --nproc-per-node)");
    }
}
