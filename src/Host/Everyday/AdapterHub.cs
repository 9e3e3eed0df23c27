using LoRAHub.Abstractions;
using LoRAHub.Host.Plugins;
using LoRAHub.Tuners.Lora;

namespace LoRAHub.Host.Everyday;

/// <summary>
/// Named adapters on one base model, for mixed batches (<see cref="IAdapterSet.UseAdapterPerRow"/>): adapters are
/// registered by name and folder, loaded on demand and evicted least-recently-used beyond <see cref="MaxLoaded"/> (as
/// LoRAX does), so memory stays bounded however many are registered. Not thread-safe: one thread (serve's worker, or
/// a command) owns it, and it never changes the set while a batch runs.
/// </summary>
/// <param name="allowBaseRewrites">
/// Whether adapters whose method rewrites the base weights themselves (<see cref="IAdapterMethod.ChangesBaseWeights"/>:
/// GaLore, full fine-tuning) may be registered. Such an adapter can be neither disabled nor unloaded, so once it is
/// loaded the base model and every other adapter are gone for good: a server (the default) refuses them, a command that
/// runs it last (generate) allows them.
/// </param>
public sealed class AdapterHub(IAdaptableModel model, IMethodRegistry methods, int maxLoaded = 8, bool allowBaseRewrites = false) : IDisposable
{
    private readonly Dictionary<string, string> registered = new(StringComparer.Ordinal);
    private readonly Dictionary<string, IAdapterMethod> methodOf = new(StringComparer.Ordinal); // the method that claims each folder
    // Served name → the name inside the set (the first adapter keeps the name its method gave it, e.g. "default").
    private readonly Dictionary<string, string> loaded = new(StringComparer.Ordinal);
    private readonly LinkedList<string> recency = new(); // most recently used first
    private IAdapter? owner; // the adapter object that holds the set
    private int counter;

    public int MaxLoaded { get; } = maxLoaded >= 1 ? maxLoaded : throw new ArgumentOutOfRangeException(nameof(maxLoaded), "at least one adapter must fit");

    /// <summary>Registered adapters by name → folder.</summary>
    public IReadOnlyDictionary<string, string> Registered => registered;

    /// <summary>Adapters in memory now, most recently used first.</summary>
    public IReadOnlyList<string> Loaded => [.. recency];

    /// <summary>The set the loaded adapters live in; null while none is loaded.</summary>
    public IAdapterSet? Set => owner as IAdapterSet;

    /// <summary>Registers (or re-points) a name; it loads when first used. Throws for a bad name or a folder that is not an adapter.</summary>
    public void Register(string name, string directory)
    {
        CheckName(name);
        var full = Path.GetFullPath(directory);
        if (!Directory.Exists(full))
            throw new DirectoryNotFoundException($"adapter folder not found: {full}");
        var method = methods.ForFolder(full); // fails now, naming the cause, rather than on the first request
        if (method.ChangesBaseWeights && !allowBaseRewrites)
            throw new ArgumentException($"adapter '{name}' ({full}) cannot be served beside the base model: {method.Name} rewrites the base " +
                "weights themselves, so it can be neither disabled for base-model requests nor unloaded for other adapters. " +
                $"Serve it as a model of its own: loraHub merge <base model> {full} -o <folder>, then loraHub serve <folder>");
        if (registered.TryGetValue(name, out var old) && old != full) Unload(name);
        registered[name] = full;
        methodOf[name] = method;
    }

    /// <summary>Unloads and unregisters; false when the name is unknown. Where the unload fails, the adapter stays registered and loaded.</summary>
    public bool Remove(string name)
    {
        if (!registered.ContainsKey(name)) return false;
        Unload(name);
        registered.Remove(name);
        methodOf.Remove(name);
        return true;
    }

    /// <summary>
    /// Readies the model for a batch whose rows use these served names (<see cref="IAdapterSet.BaseName"/>: the base
    /// model): loads what is missing, evicting the least recently used adapters this batch does not need, and returns
    /// the set with each row's name in it for <see cref="IAdapterSet.UseAdapterPerRow"/>. An adapter whose method has no
    /// IAdapterSet is served alone: Set is null and Scope (dispose it after the batch) switches it off for base rows;
    /// a batch that mixes it with anything else throws <see cref="MixedBatchNotSupportedException"/>, and so does one
    /// that mixes adapters that cannot join one set (<see cref="Batches"/> splits a request into batches that can).
    /// Adapters of the tuner kit's LoRA methods (<see cref="ILoraMethod"/>: LoRA, DoRA, ...) join one set in any order.
    /// </summary>
    public (IAdapterSet? Set, IReadOnlyList<string> Rows, IDisposable? Scope) Prepare(IReadOnlyList<string> names)
    {
        var needed = names.Where(n => n != IAdapterSet.BaseName).Distinct().ToList();
        if (needed.Count > MaxLoaded)
            throw new InvalidOperationException($"a batch needs {needed.Count} adapters but at most {MaxLoaded} may be loaded at once");
        foreach (var name in needed)
        {
            if (!registered.ContainsKey(name)) throw new KeyNotFoundException($"no adapter named '{name}'");
            if (!loaded.ContainsKey(name))
            {
                // One that cannot join the loaded set needs the model to itself: the others go first.
                var limit = owner is null || Joins(name) ? MaxLoaded : 1;
                while (loaded.Count > 0 && loaded.Count >= limit)
                    Unload(recency.Reverse().FirstOrDefault(n => !needed.Contains(n))
                           ?? throw new MixedBatchNotSupportedException(owner is IAdapterSet
                               ? $"adapter '{name}' ({methodOf[name].Name}) cannot share a batch with the {owner.Method.Name} adapters loaded"
                               : $"{owner!.Method.Name} adapters are served one at a time"));
                Load(name);
            }
            recency.Remove(name);
            recency.AddFirst(name);
        }
        if (owner is IAdapterSet set) return (set, names.Select(n => n == IAdapterSet.BaseName ? n : loaded[n]).ToList(), null);
        var plain = names.Select(_ => IAdapterSet.BaseName).ToList();
        if (owner is null || needed.Count == 0) return (null, plain, owner?.DisableAdapter());
        if (needed.Count == 1 && names.All(n => n == needed[0])) return (null, plain, null);
        throw new MixedBatchNotSupportedException($"{owner.Method.Name} adapters cannot share a batch with other adapters or the base model (the method does not implement IAdapterSet)");
    }

    /// <summary>Whether batches may mix adapters: false once an adapter without IAdapterSet is loaded.</summary>
    public bool CanMix => owner is null or IAdapterSet;

    /// <summary>
    /// The served names of a request (<see cref="IAdapterSet.BaseName"/>: the base model) split into batches that can each
    /// be one <see cref="Prepare"/>, each name once: first the base model with the adapters of the tuner kit's LoRA
    /// methods (<see cref="ILoraMethod"/>), which share one set; then every other adapter in a batch of its own (its
    /// method may not mix, e.g. GaLore and full fine-tuning, which rewrite the base weights), in order of first use.
    /// </summary>
    public IReadOnlyList<IReadOnlyList<string>> Batches(IReadOnlyList<string> names)
    {
        foreach (var name in names)
            if (name != IAdapterSet.BaseName && !registered.ContainsKey(name)) throw new KeyNotFoundException($"no adapter named '{name}'");
        var distinct = names.Distinct().ToList();
        var shared = distinct.Where(n => n == IAdapterSet.BaseName || methodOf[n] is ILoraMethod).ToList();
        var batches = new List<IReadOnlyList<string>>();
        if (shared.Count > 0) batches.Add(shared);
        batches.AddRange(distinct.Except(shared).Select(n => (IReadOnlyList<string>)[n]));
        return batches;
    }

    // Whether the adapter can join the set loaded now: one of the owner's own method, or one of a LoRA-kit method in a
    // LoRA set (where the set is the kit's LoraAdapter it accepts the method's variants, e.g. DoRA's; plain LoRA joins any).
    private bool Joins(string name)
    {
        if (owner is not IAdapterSet) return false;
        var method = methodOf[name];
        if (ReferenceEquals(method, owner.Method)) return true;
        return owner.Method is ILoraMethod && method is ILoraMethod kit && (owner is LoraAdapter || kit.LoraVariants.Count == 0);
    }

    private void Load(string name)
    {
        var directory = registered[name];
        if (owner is IAdapterSet set)
        {
            // A LoRA set made by one method loads another's variant (a DoRA folder in the "lora" method's set), as PEFT does.
            if (owner is LoraAdapter lora && methodOf[name] is ILoraMethod kit) lora.AcceptVariants(kit.LoraVariants);
            var internalName = $"hub{++counter}";
            set.LoadAdapter(directory, internalName);
            loaded[name] = internalName;
            CheckPerRow(name);
            return;
        }
        if (owner is not null) throw new MixedBatchNotSupportedException($"{owner.Method.Name} adapters are served one at a time");
        owner = methodOf[name].Load(model, directory);
        loaded[name] = owner is IAdapterSet first ? first.AdapterNames[^1] : name;
        if (owner is IAdapterSet) CheckPerRow(name);
    }

    // An adapter the set cannot mix (e.g. one with modules_to_save) is refused when it loads, naming why, rather than
    // failing every batch it would share later.
    private void CheckPerRow(string name)
    {
        try
        {
            ((IAdapterSet)owner!).UseAdapterPerRow([loaded[name], IAdapterSet.BaseName]).Dispose();
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            Unload(name);
            throw new NotSupportedException($"adapter '{name}' ({registered[name]}) cannot share a batch with other adapters: {e.Message}", e);
        }
    }

    // The bookkeeping changes only once the adapter is really gone: if the owner refuses (a method that cannot unload),
    // the hub still says truthfully what is loaded.
    private void Unload(string name)
    {
        if (!loaded.TryGetValue(name, out var internalName)) return;
        if (loaded.Count == 1)
        {
            // The last one: give the model back its plain layers.
            owner!.Unload();
            owner.Dispose();
            owner = null;
        }
        else ((IAdapterSet)owner!).DeleteAdapter(internalName); // several are loaded only when the owner is a set
        loaded.Remove(name);
        recency.Remove(name);
    }

    /// <summary>Names must be usable as OpenAI model ids and in URLs: letters, digits, '.', '_', '-', up to 100 characters.</summary>
    public static void CheckName(string name)
    {
        if (string.IsNullOrWhiteSpace(name) || name.Length > 100 || !name.All(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-'))
            throw new ArgumentException($"bad adapter name '{name}': use letters, digits, '.', '_' and '-' (at most 100 characters)");
        if (name == IAdapterSet.BaseName) throw new ArgumentException($"'{IAdapterSet.BaseName}' is reserved for the base model");
    }

    public void Dispose()
    {
        try
        {
            foreach (var name in loaded.Keys.ToList()) Unload(name);
        }
        catch (NotSupportedException) when (owner is not null and not IAdapterSet)
        {
            // An adapter that rewrote the base weights (full fine-tuning) cannot give them back: it is dropped, and the
            // model keeps its weights.
            owner.Dispose();
            owner = null;
            loaded.Clear();
            recency.Clear();
        }
    }
}

/// <summary>A batch asked for several adapters (or an adapter and the base model) that cannot share one forward.</summary>
public sealed class MixedBatchNotSupportedException(string message) : Exception(message);
