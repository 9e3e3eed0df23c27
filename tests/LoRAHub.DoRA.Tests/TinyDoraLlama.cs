using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions.Optim;
using static LoRAHub.DoRA.Tests.NormReference;

namespace LoRAHub.DoRA.Tests;

/// <summary>
/// What the norm tests train and then inspect: a 2-layer Llama (bf16 on CUDA, fp32 on the CPU) with DoRA r8 on all seven
/// projections (random init), activation checkpointing on, trained by AdamW on one fixed batch with the fused blocks.
/// </summary>
internal sealed class TinyDoraLlama : IDisposable
{
    public readonly LlamaForCausalLM Model;
    public readonly LoraAdapter Adapter;
    private readonly AdamW optimizer;
    private readonly Tensor ids;

    public TinyDoraLlama()
    {
        var config = new LlamaConfig
        {
            HiddenSize = 64, IntermediateSize = 96, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
            VocabSize = 64, TieWordEmbeddings = true, RopeTheta = 10000, MaxPositionEmbeddings = 64,
        };
        Model = LlamaForCausalLM.CreateRandom(config, Cuda ? ScalarType.BFloat16 : ScalarType.Float32, Dev, seed: 1);
        Model.GradientCheckpointing = true;
        torchx.manual_seed(6);
        Adapter = (LoraAdapter)new DoraMethod().Attach(Model, new DoraOptions
        {
            R = 8, LoraAlpha = 16, TargetModules = new[] { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" },
            InitLoraWeights = LoraInit.Random,
        });
        Model.train();
        optimizer = new AdamW(Adapter.ParameterGroups(2e-2, 0.0));
        using var gen = new Generator(3);
        ids = randint(0, 64, [2, 16], generator: gen).to(Dev);
    }

    /// <summary>Steps 0 .. steps−1 (each between the adapter's step hooks), with the fused blocks; their losses.</summary>
    public List<double> Train(int steps)
    {
        var losses = new List<double>();
        for (var step = 0; step < steps; step++)
            losses.Add(FusedBlocks.WithFused(true, () =>
            {
                using var scope = torch.NewDisposeScope();
                Adapter.OnStepBegin(step);
                var loss = Model.ComputeLoss(ids, ids);
                loss.backward();
                optimizer.step();
                optimizer.zero_grad();
                Adapter.OnStepEnd(step);
                return loss.ToDouble();
            }));
        return losses;
    }

    public void Dispose()
    {
        ids.Dispose();
        optimizer.Dispose();
        Adapter.Dispose();
        Model.Dispose();
    }
}
