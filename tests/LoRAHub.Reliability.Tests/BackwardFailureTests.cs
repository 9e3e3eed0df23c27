using System.Runtime.InteropServices;
using LoRAHub.TorchExtensions.Optim;
using LoRAHub.Training.Checkpoints;
using Xunit.Abstractions;

namespace LoRAHub.Reliability.Tests;

/// <summary>
/// An exception inside a custom backward (our fused kernels' CustomFunction: a failed allocation, a bug) surfaces from
/// Trainer.Train as a managed exception with the original as its cause; the process lives on, and the run resumes from
/// its last checkpoint to the same result as an uninterrupted one.
/// </summary>
[Collection(Serial.Name)]
public sealed class BackwardFailureTests(ITestOutputHelper output)
{
    /// <summary>Identity forward; backward throws what <see cref="Fail"/> makes, when it is set.</summary>
    private sealed class FragileIdentity : CustomFunction
    {
        public static Func<Exception>? Fail;
        protected override string name => "fragile_identity";
        protected override Tensor[] forward(Tensor?[] inputs) => [inputs[0]!.clone()];
        protected override Tensor?[] backward(Tensor[] grad_outputs) => Fail is { } make ? throw make() : [grad_outputs[0].clone()];
    }

    /// <summary>embedding → fragile identity → Linear head: a language model whose backward runs through a CustomFunction.</summary>
    private sealed class FragileModel : nn.Module<Tensor, Tensor>, ICausalLanguageModel
    {
        private readonly nn.Module<Tensor, Tensor> embed;
        private readonly nn.Module<Tensor, Tensor> lm_head;

        public FragileModel() : base(nameof(FragileModel))
        {
            torchx.manual_seed(4);
            embed = nn.Embedding(64, 16);
            lm_head = nn.Linear(16, 64);
            RegisterComponents();
        }

        public nn.Module Root => this;
        public Device Device => CPU;
        public ScalarType DType => ScalarType.Float32;
        public string ModelType => "fragile";
        public string NameOrPath => "fragile";
        public IReadOnlyList<string> OutputModuleNames => ["lm_head"];
        public AttentionFunction Attention { get; set; } = (q, k, v, m) => q;
        public bool GradientCheckpointing { get; set; }
        public int LayerCount => 1;
        public int VocabSize => 64;
        public override Tensor forward(Tensor input) => Forward(input);

        public Tensor Forward(Tensor inputIds, Tensor? attentionMask = null)
        {
            using var scope = torch.NewDisposeScope();
            var h = new FragileIdentity().apply(embed.forward(inputIds))[0];
            return lm_head.forward(h).MoveToOuterDisposeScope();
        }

        public Tensor ComputeLoss(Tensor inputIds, Tensor labels, Tensor? attentionMask = null)
        {
            using var scope = torch.NewDisposeScope();
            var logits = Forward(inputIds);
            var t = inputIds.size(1);
            var loss = nn.functional.cross_entropy(logits[.., ..(int)(t - 1)].reshape(-1, 64), labels[.., 1..].reshape(-1));
            return loss.MoveToOuterDisposeScope();
        }
    }

    private static TrainResult Train(string dir, bool resume = false, long failAtStep = 0, Func<Exception>? failure = null)
    {
        using var model = new FragileModel();
        var trainer = new Trainer(model, new FullFineTuning().Attach(model, new FullFineTuningOptions()), new TrainerOptions
        {
            OutputDir = dir, MaxSteps = 6, BatchSize = 4, LearningRate = 1e-2, SaveEvery = 1, Seed = 3, ShowProgress = false, LogEvery = 0, Resume = resume,
        });
        trainer.StepCompleted += m => { if (m.Step == failAtStep - 1) FragileIdentity.Fail = failure; };
        try
        {
            var result = trainer.Train(TrainChild.Data(64));
            return result;
        }
        finally
        {
            FragileIdentity.Fail = null;
        }
    }

    [Fact]
    public void An_exception_in_a_custom_backward_is_a_managed_error_and_the_run_resumes_exactly()
    {
        using var temp = new TempFolder("backward");
        var expected = Train(temp["reference"]).Losses;

        var e = Assert.ThrowsAny<TorchException>(() => Train(temp["run"], failAtStep: 4, failure: () => new InvalidOperationException("kernel bug in backward")));
        Assert.EndsWith("checkpoint-000003", new CheckpointManager(temp["run"], 2).Latest());
        var resumed = Train(temp["run"], resume: true).Losses;
        Assert.Equal(expected, resumed);
        output.WriteLine($"custom backward threw at step 4: {e.GetType().Name}: {e.Message}; the process went on and resumed from step 3 to the same {resumed.Count} losses");
    }

    // The trainer's exception filters translate the same exception twice (classify, then rethrow typed): the kept
    // backward failure must survive the first call, and an out-of-memory cause must get the out-of-memory advice.
    [Fact]
    public void The_cause_of_a_custom_backward_failure_reaches_the_message()
    {
        using var temp = new TempFolder("backward-cause");
        var e = Assert.ThrowsAny<TorchException>(() => Train(temp["run"], failAtStep: 4, failure: () => new InvalidOperationException("kernel bug in backward")));
        Assert.Contains("kernel bug in backward", e.Message);
    }

    [Fact]
    public void Out_of_memory_in_a_custom_backward_gives_the_out_of_memory_advice()
    {
        using var temp = new TempFolder("backward-oom");
        // What a CUDA allocation failing inside a fused kernel's backward raises (libtorch's message through TorchSharp).
        var e = Assert.Throws<TrainingException>(() => Train(temp["run"], failAtStep: 3,
            failure: () => new ExternalException("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB")));
        Assert.Contains("BatchSize", e.Message);
        Assert.Contains("checkpoint-000002", e.Message);
        Assert.Equal(6, Train(temp["run"], resume: true).Steps);
    }
}
