using System.CommandLine;
using LoRAHub.Distributed.Launch;
using LoRAHub.Host.Commands;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Host.Launch;

/// <summary>
/// `run --nproc-per-node N [--nnodes M --node-rank K --master-addr A --master-port P] script.csx`: this process becomes
/// the launcher and starts N copies of `loraHub run script.csx` (the same options and script arguments, without the
/// launch options) as the ranks of this node. GPUs take NCCL (rank i on cuda:LOCAL_RANK), the CPU takes MPI under
/// mpiexec; LORAHUB_DIST_BACKEND overrides.
/// </summary>
public static class LaunchCommandLine
{
    public static readonly Option<int?> NprocPerNode = new("--nproc-per-node") { Description = "Start this many ranks on this machine (data-parallel training, like torchrun)" };
    public static readonly Option<int> Nnodes = new("--nnodes") { Description = "Machines in the run", DefaultValueFactory = _ => 1 };
    public static readonly Option<int> NodeRank = new("--node-rank") { Description = "This machine's index, 0..nnodes-1", DefaultValueFactory = _ => 0 };
    public static readonly Option<string> MasterAddr = new("--master-addr")
    {
        Description = "Address of the machine of rank 0", DefaultValueFactory = _ => Distributed.DistributedEnvironment.DefaultMasterAddr,
    };
    public static readonly Option<int> MasterPort = new("--master-port")
    {
        Description = "Free TCP port on the machine of rank 0 for the rendezvous", DefaultValueFactory = _ => Distributed.DistributedEnvironment.DefaultMasterPort,
    };

    public static IEnumerable<Option> Options => [NprocPerNode, Nnodes, NodeRank, MasterAddr, MasterPort];

    /// <summary>Starts the ranks and waits for them; the exit code is non-zero when any rank failed.</summary>
    public static int Launch(ParseResult parse, LoRAHubCli cli, string scriptPath, Device device, int nproc)
    {
        var backend = Environment.GetEnvironmentVariable(Distributed.distributed.BackendVariable) is { Length: > 0 } b
            ? b.ToLowerInvariant()
            : device.type == DeviceType.CUDA ? "nccl" : "mpi";
        var options = new LaunchOptions
        {
            NprocPerNode = nproc, Nnodes = parse.GetValue(Nnodes), NodeRank = parse.GetValue(NodeRank),
            MasterAddr = parse.GetValue(MasterAddr)!, MasterPort = parse.GetValue(MasterPort), Backend = backend,
        };
        options.Validate();
        if (backend == "nccl" && cuda.device_count() < nproc)
            throw new ArgumentException($"--nproc-per-node {nproc} needs {nproc} GPUs (one per rank); this machine shows {cuda.device_count()}");

        var args = new List<string> { "run" };
        if (parse.GetValue(RunCommand.Method) is { } method) args.AddRange(["--method", method]);
        if (parse.GetValue(RunCommand.DeviceOption) is { } d) args.AddRange(["--device", d]);
        if (parse.GetValue(LoRAHubCli.Verbose)) args.Add("--verbose");
        if (parse.GetValue(LoRAHubCli.PluginPath) is { } plugins) args.AddRange(["--plugins", plugins]);
        args.Add(scriptPath);
        args.AddRange(cli.ScriptArgs);
        var (executable, prefix) = HostCommand(cli);
        cli.Error.WriteLine($"launching {options.WorldSize} ranks ({nproc} on this node, {backend}); rank 0 at {options.MasterAddr}:{options.MasterPort}");
        return RankLauncher.Run(options, executable, [.. prefix, .. args], cli.Error, output: cli.Output);
    }

    /// <summary>How to start this host again: `dotnet loraHub.dll` from its folder, or this very executable.</summary>
    private static (string executable, string[] prefix) HostCommand(LoRAHubCli cli)
    {
        var dll = Path.Combine(cli.HostBaseDirectory, "loraHub.dll");
        var process = Environment.ProcessPath ?? "dotnet";
        var muxer = Path.GetFileNameWithoutExtension(process) == "dotnet" ? process : "dotnet";
        if (File.Exists(dll)) return (muxer, [dll]);
        return (process, []);
    }
}
