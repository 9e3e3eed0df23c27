// A TorchSharp user's own model fine-tuned with LoRA and DoRA: attach through IAdapterMethod, train with a plain loop,
// save in PEFT's format, reload onto a fresh copy, merge_and_unload and export plain weights.
// Run: dotnet run --project samples/OwnModel -c Release [-- output-folder]
using LoRAHub.Abstractions;
using LoRAHub.Models;
using LoRAHub.Plugins.DoRA;
using LoRAHub.Plugins.LoRA;
using LoRAHub.Samples.OwnModel;
using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;
using AdamW = LoRAHub.TorchExtensions.Optim.AdamW;

TorchRuntime.Initialize();
var device = cuda.is_available() ? CUDA : CPU;
var output = args.Length > 0 ? args[0] : Path.Combine(Path.GetTempPath(), "lorahub-own-model");
var config = new TinyTransformer.Config();

// The task: continue sequences that count up in steps of 3 (mod vocab) from random starts.
torchx.manual_seed(1234);
var starts = randint(config.Vocab, [16, 1], device: device);
var sequences = (starts + 3 * arange(17, device: device)).remainder(config.Vocab);
var (inputs, targets) = (sequences[.., ..16], sequences[.., 1..]);

foreach (IAdapterMethod method in new IAdapterMethod[] { new LoraMethod(), new DoraMethod() })
{
    Console.WriteLine($"== {method.Name}: {method.Description}");
    using var model = new TinyTransformer(config, seed: 0, device);
    // The wrapper tells the method where the module tree is; "head" is the output head ("all-linear" leaves it alone).
    var adaptable = TorchSharpModel.Wrap(model, name: "samples/OwnModel/TinyTransformer", outputModules: ["head"]);
    using var adapter = method.Attach(adaptable, new { r = 8, lora_alpha = 16, target_modules = new[] { "q_proj", "v_proj", "fc1", "fc2" } });
    Console.WriteLine(adapter.TrainableParametersReport());

    // A plain training loop; the step hooks are what LoRAHub's trainer calls (DoRA caches its weight norm per step).
    using var optimizer = new AdamW(adapter.ParameterGroups(learningRate: 1e-2, weightDecay: 0.0));
    model.train();
    for (var step = 0; step < 60; step++)
    {
        using var scope = NewDisposeScope();
        adapter.OnStepBegin(step);
        optimizer.zero_grad();
        var loss = nn.functional.cross_entropy(model.call(inputs).reshape(-1, config.Vocab), targets.reshape(-1));
        loss.backward();
        adapter.OnAfterBackward(step);
        optimizer.step();
        adapter.OnStepEnd(step);
        if (step % 10 == 0 || step == 59) Console.WriteLine($"step {step,2}  loss {loss.item<float>():F4}");
    }
    model.eval();

    using var _ = no_grad();
    var adapted = model.call(inputs);

    // PEFT's folder: adapter_config.json + adapter_model.safetensors, loadable by PEFT onto the same architecture.
    var folder = Path.Combine(output, method.Name);
    adapter.Save(folder);
    using (var fresh = new TinyTransformer(config, seed: 0, device))
    using (method.Load(TorchSharpModel.Wrap(fresh, name: "samples/OwnModel/TinyTransformer", outputModules: ["head"]), folder))
        Console.WriteLine($"reloaded onto a fresh copy: max |Δ| = {MaxDiff(fresh.call(inputs), adapted):G3}");

    // MergeAndUnload folds the adapter into the base weights and puts plain Linear layers back: the model's state dict has
    // the plain model's names and loads into a plain TinyTransformer (here one built from another seed) that needs no LoRAHub.
    adapter.MergeAndUnload();
    var merged = Path.Combine(folder, "merged.safetensors");
    torchx.save_safetensors(model.state_dict(), merged);
    using var plain = new TinyTransformer(config, seed: 1, device);
    torchx.load_safetensors_into(plain.state_dict(), merged);
    plain.eval();
    Console.WriteLine($"merged model (plain TinyTransformer): max |Δ| = {MaxDiff(plain.call(inputs), adapted):G3}; saved in {folder}");
}

static double MaxDiff(Tensor a, Tensor b) => (a - b).abs().max().item<float>();
