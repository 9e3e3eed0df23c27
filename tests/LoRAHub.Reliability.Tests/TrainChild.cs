using System.Globalization;
using System.Security.Cryptography;
using LoRAHub.Models.Llama;
using LoRAHub.Plugins.LoRA;
using LoRAHub.Tuners;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// A small but real training run for crash tests: a Llama decoder from our model code (2 layers, hidden 32), the LoRA
/// plugin with dropout (so the RNG state must be restored too), AdamW, a cosine schedule, shuffled data over more than
/// one epoch, and a checkpoint after every step. It prints one line per step with the loss's exact bits, so a parent can
/// compare curves bit for bit, and the hash of the final adapter weights.
/// <code>train-child &lt;dir&gt; &lt;steps&gt; [resume] [save-every=N] [batch=N] [device=cpu|cuda] [rss-every=N] [model=tiny|big] [examples=N] [length=N] [wait-after-loss]</code>
/// (model=big, with long sequences, is for the GPU scripts: wide enough that a huge batch runs the GPU out of memory.)
/// </summary>
public static class TrainChild
{
    public const string Verb = "train-child";

    /// <summary>
    /// After each step's lines the child blocks until it reads a line from stdin (end of input: it stops waiting), so a
    /// parent that kills on a loss line is never outrun by the child (ChildProcess.Train acknowledges each one).
    /// </summary>
    public const string WaitAfterLoss = "wait-after-loss";

    public static bool IsLossLine(string line) => line.StartsWith("loss ", StringComparison.Ordinal);

    public const string TinyLlamaConfig = """
        {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": false}
        """;

    public static int Run(string[] args)
    {
        var dir = args[0];
        var steps = long.Parse(args[1], CultureInfo.InvariantCulture);
        var flags = args.Skip(2).ToList();
        string? Flag(string name) => flags.FirstOrDefault(f => f.StartsWith(name + "=", StringComparison.Ordinal))?[(name.Length + 1)..];
        var resume = flags.Contains("resume");
        var saveEvery = long.Parse(Flag("save-every") ?? "1", CultureInfo.InvariantCulture);
        var batch = int.Parse(Flag("batch") ?? "4", CultureInfo.InvariantCulture);
        var rssEvery = long.Parse(Flag("rss-every") ?? "0", CultureInfo.InvariantCulture);
        var device = torch.device(Flag("device") ?? "cpu");
        var big = Flag("model") == "big";
        var examples = int.Parse(Flag("examples") ?? "36", CultureInfo.InvariantCulture);
        var length = int.Parse(Flag("length") ?? "20", CultureInfo.InvariantCulture);
        var waitAfterLoss = flags.Contains(WaitAfterLoss);
        torch.set_num_threads(1);

        using var model = TinyModel(device, big);
        using var adapter = AttachLora(model);
        var trainer = new Trainer(model, adapter, new TrainerOptions
        {
            OutputDir = dir, MaxSteps = steps, BatchSize = batch, LearningRate = 1e-2, WarmupSteps = Math.Min(2, steps),
            Schedule = LearningRateSchedule.Cosine, SaveEvery = saveEvery, KeepLastCheckpoints = 2, Seed = 3,
            ShowProgress = false, LogEvery = 0, Resume = resume,
        });
        trainer.StepCompleted += m =>
        {
            Console.Out.WriteLine($"loss {m.Step} {BitConverter.DoubleToInt64Bits(m.Loss):X16}");
            if (rssEvery > 0 && m.Step % rssEvery == 0)
            {
                Console.Out.WriteLine($"rss {m.Step} {CurrentRss()}");
                if (device.type == DeviceType.CUDA)
                    Console.Out.WriteLine($"cuda {m.Step} {torchx.cuda.memory_allocated(Math.Max(0, device.index))} {torchx.cuda.memory_reserved(Math.Max(0, device.index))}");
            }
            Console.Out.Flush();
            if (waitAfterLoss && Console.In.ReadLine() is null) waitAfterLoss = false;
        };
        var result = trainer.Train(Data(model.Config.VocabSize, examples, length), padTokenId: 0);
        Console.Out.WriteLine($"final {result.Steps} {WeightsHash(model)}");
        return 0;
    }

    /// <summary>For the GPU scripts: a 32k vocabulary and 2k positions, so a huge batch of long sequences cannot fit.</summary>
    public const string BigLlamaConfig = """
        {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": false}
        """;

    public static LlamaForCausalLM TinyModel(Device? device = null, bool big = false)
    {
        torchx.manual_seed(1);
        var model = new LlamaForCausalLM(LlamaConfig.FromJson(big ? BigLlamaConfig : TinyLlamaConfig), ScalarType.Float32, device ?? CPU);
        model.Root.train();
        return model;
    }

    public static IAdapter AttachLora(IAdaptableModel model)
    {
        torchx.manual_seed(2);
        return new LoraMethod().Attach(model, new LoraOptions
        {
            R = 4, LoraAlpha = 8, LoraDropout = 0.1, InitLoraWeights = LoraInit.Gaussian, TargetModules = new[] { "q_proj", "v_proj", "down_proj" },
        });
    }

    /// <summary>By default 36 sequences of 8 to 20 tokens: 9 batches of 4 per epoch, so a dozen steps cross an epoch boundary.</summary>
    public static TextDataset Data(int vocab, int count = 36, int maxLength = 20)
    {
        var random = new Random(5);
        var examples = new List<TokenizedExample>();
        for (var i = 0; i < count; i++)
        {
            // A learnable pattern: each token is the previous one plus a per-sequence stride.
            var length = random.Next(Math.Min(8, maxLength), maxLength + 1);
            var stride = random.Next(1, 4);
            var ids = new int[length];
            ids[0] = 1;
            var start = random.Next(3, vocab);
            for (var t = 1; t < length; t++) ids[t] = 3 + (start + t * stride) % (vocab - 3);
            examples.Add(new TokenizedExample(ids, (int[])ids.Clone()));
        }
        return new TextDataset(examples);
    }

    /// <summary>SHA-256 over every parameter's name and bytes: equal hashes mean bit-identical weights.</summary>
    public static string WeightsHash(IAdaptableModel model)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var (name, p) in model.Root.named_parameters().OrderBy(p => p.name, StringComparer.Ordinal))
        {
            sha.AppendData(System.Text.Encoding.UTF8.GetBytes(name));
            using var cpu = p.detach().cpu().contiguous();
            sha.AppendData(cpu.bytes);
        }
        return Convert.ToHexStringLower(sha.GetHashAndReset());
    }

    /// <summary>Resident set size in bytes (Linux /proc; the GC's view elsewhere).</summary>
    public static long CurrentRss()
    {
        if (File.Exists("/proc/self/statm"))
        {
            var pages = long.Parse(File.ReadAllText("/proc/self/statm").Split(' ')[1], CultureInfo.InvariantCulture);
            return pages * Environment.SystemPageSize;
        }
        using var self = System.Diagnostics.Process.GetCurrentProcess();
        return self.WorkingSet64;
    }
}
