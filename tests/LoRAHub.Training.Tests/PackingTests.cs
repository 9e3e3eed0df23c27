using LoRAHub.TorchExtensions.Optim;
using LoRAHub.Models.Llama;

namespace LoRAHub.Training.Tests;

/// <summary>
/// Padding-free packing: the packer's plan and rows, and a packed training run whose loss per step equals the padded
/// run's (fp32 tiny Llama, rows of unequal lengths), with a clear fallback where packing is not exact.
/// </summary>
[Collection(GlobalRngCollection.Name)]
public sealed class PackingTests : IDisposable
{
    private readonly string dir = Path.Combine(Path.GetTempPath(), "lorahub-pack-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
    }

    private static TextDataset UnequalRows() => TrainingData.UnequalRows();

    private static LlamaConfig TinyLlama() => TrainingData.TinyLlama();

    [Fact]
    public void The_plan_is_first_fit_decreasing_within_the_longest_example()
    {
        var plan = SequencePacking.Plan([5, 9, 3, 4, 9, 1], 9);
        Assert.Equal([[1], [4], [0, 3], [2, 5]], plan.Select(r => r.ToArray()).ToArray());
        Assert.Throws<ArgumentException>(() => SequencePacking.Plan([10], 9));
    }

    [Fact]
    public void A_packed_batch_holds_the_same_tokens_with_positions_per_example_and_no_cross_example_target()
    {
        TokenizedExample E(params int[] ids) => new(ids, ids.Select((t, j) => j == 1 ? -100 : t).ToArray());
        using var batch = DataLoader.Collate([E(11, 12, 13), E(21, 22, 23, 24, 25), E(31, 32)], 0, CPU);
        using var packed = SequencePacking.Pack(batch)!;
        // Rows: [example 1] and [example 0, example 2], 5 wide.
        Assert.Equal([2L, 5L], packed.InputIds.shape);
        Assert.Equal([21L, 22, 23, 24, 25, 11, 12, 13, 31, 32], packed.InputIds.data<long>().ToArray());
        Assert.Equal([0L, 1, 2, 3, 4, 0, 1, 2, 0, 1], packed.PositionIds!.data<long>().ToArray());
        Assert.Equal([-100L, -100, 23, 24, 25, -100, -100, 13, -100, -100], packed.Labels.data<long>().ToArray());
        Assert.Equal(batch.Tokens, packed.Tokens);
        Assert.Equal(4, packed.LabelTokens); // the padded batch's targets: labels from position 1 on
        // No padding (every row full): the padded batch stays, with plain causal attention.
        using var full = DataLoader.Collate([E(1, 2), E(3, 4)], 0, CPU);
        Assert.Null(SequencePacking.Pack(full));
    }

    private (double[] losses, int packedCalls, List<string> log) Run(string name, bool packing, bool checkpointing = false, bool replaceAttention = false,
        string method = "full")
    {
        using var llama = LlamaForCausalLM.CreateRandom(TinyLlama(), ScalarType.Float32, CPU, seed: 2);
        if (replaceAttention) llama.Attention = (q, k, v, m) => LlamaForCausalLM.DefaultAttention(q, k, v, m);
        using var model = new CountingModel(llama);
        var log = new List<string>();
        var trainer = new Trainer(model, new Renamed(new FullFineTune(llama), method), new TrainerOptions
        {
            OutputDir = Path.Combine(dir, name), MaxSteps = 5, BatchSize = 6, GradientAccumulationSteps = 2, LearningRate = 1e-2,
            WarmupSteps = 0, Schedule = LearningRateSchedule.Constant, ShowProgress = false, LogEvery = 0, Seed = 3,
            Packing = packing, GradientCheckpointing = checkpointing,
        }, log.Add);
        return (trainer.Train(UnequalRows()).Losses.ToArray(), model.PackedCalls, log);
    }

    [Fact]
    public void A_packed_run_has_the_padded_runs_loss_at_every_step()
    {
        var (padded, paddedPackedCalls, _) = Run("padded", packing: false);
        // Attention split by example (CUDA's default path; the CPU's is the block-diagonal mask), layers recomputed in backward.
        var before = PackedAttention.SplitByExample;
        PackedAttention.SplitByExample = true;
        (double[] losses, int calls, List<string> log) split;
        try
        {
            split = Run("packed", packing: true, checkpointing: true);
        }
        finally
        {
            PackedAttention.SplitByExample = before;
        }
        var (packed, packedCalls, log) = split;
        var (masked, _, _) = Run("masked", packing: true);
        Assert.Equal(0, paddedPackedCalls);
        Assert.True(packedCalls >= 5, $"only {packedCalls} micro-batches were packed");
        Assert.DoesNotContain(log, l => l.Contains("packing off"));
        Assert.True(padded.Distinct().Count() > 1);
        for (var i = 0; i < padded.Length; i++)
        {
            Assert.True(Math.Abs(padded[i] - packed[i]) <= 1e-5 * padded[i], $"step {i + 1}: padded {padded[i]}, packed {packed[i]}");
            Assert.True(Math.Abs(padded[i] - masked[i]) <= 1e-5 * padded[i], $"step {i + 1}: padded {padded[i]}, packed with the mask {masked[i]}");
        }
    }

    [Fact]
    public void Evaluation_on_packed_rows_gives_the_padded_loss()
    {
        double Eval(bool packing)
        {
            using var llama = LlamaForCausalLM.CreateRandom(TinyLlama(), ScalarType.Float32, CPU, seed: 2);
            using var model = new CountingModel(llama);
            var trainer = new Trainer(model, new FullFineTune(llama), new TrainerOptions
            {
                OutputDir = Path.Combine(dir, "eval"), BatchSize = 5, ShowProgress = false, Packing = packing,
            });
            var loss = trainer.Evaluate(UnequalRows()).Loss;
            Assert.Equal(packing, model.PackedCalls > 0);
            return loss;
        }
        var (padded, packed) = (Eval(false), Eval(true));
        Assert.True(Math.Abs(padded - packed) <= 1e-5 * padded, $"eval loss: padded {padded}, packed {packed}");
    }

    [Fact]
    public void With_a_replaced_attention_the_trainer_pads_and_says_so_once()
    {
        var (_, packedCalls, log) = Run("replaced", packing: true, replaceAttention: true);
        Assert.Equal(0, packedCalls);
        Assert.Single(log, l => l.Contains("packing off"));
    }

    [Fact]
    public void With_malora_whose_balance_loss_counts_padding_the_trainer_pads()
    {
        var (_, packedCalls, log) = Run("malora", packing: true, method: "malora");
        Assert.Equal(0, packedCalls);
        Assert.Single(log, l => l.Contains("packing off: malora"));
    }

    /// <summary>Full fine-tuning under another method's name (the trainer's per-method choices).</summary>
    private sealed class Renamed(FullFineTune inner, string name) : IAdapter, IAdapterMethod
    {
        public IAdapterMethod Method => this;
        public object Options => inner.Options;
        public bool Enabled { get => inner.Enabled; set => inner.Enabled = value; }
        public long ModelParameterCount => inner.ModelParameterCount;
        public string Name => name;
        public string Description => inner.Description;
        public Type OptionsType => inner.OptionsType;
        public object CreateDefaultOptions() => inner.CreateDefaultOptions();
        public IAdapter Attach(IAdaptableModel m, object options) => this;
        public IAdapter Load(IAdaptableModel m, string directory) => this;
        public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay) => inner.ParameterGroups(learningRate, weightDecay);
        public IReadOnlyDictionary<string, Tensor> StateDict() => inner.StateDict();
        public void Save(string directory) => inner.Save(directory);
        public void Dispose() => inner.Dispose();
    }

    /// <summary>The Llama, counting packed loss calls.</summary>
    private sealed class CountingModel(LlamaForCausalLM inner) : ICausalLanguageModel
    {
        public int PackedCalls { get; private set; }
        public nn.Module Root => inner;
        public Device Device => inner.Device;
        public ScalarType DType => inner.DType;
        public string ModelType => inner.ModelType;
        public string NameOrPath => inner.NameOrPath;
        public IReadOnlyList<string> OutputModuleNames => inner.OutputModuleNames;
        public AttentionFunction Attention { get => inner.Attention; set => inner.Attention = value; }
        public bool GradientCheckpointing { get => inner.GradientCheckpointing; set => inner.GradientCheckpointing = value; }
        public int LayerCount => inner.LayerCount;
        public int VocabSize => inner.VocabSize;
        public bool SupportsPacking => inner.SupportsPacking;
        public Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null) => inner.ComputeLoss(inputIds, labels, attentionMask);
        public Tensor Forward(Tensor inputIds, Tensor? attentionMask = null) => inner.Forward(inputIds, attentionMask);

        public Tensor ComputePackedLoss(Tensor inputIds, Tensor labels, Tensor positionIds)
        {
            PackedCalls++;
            return inner.ComputePackedLoss(inputIds, labels, positionIds);
        }

        public void Dispose()
        {
        }
    }
}
