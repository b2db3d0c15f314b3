import CTraceryAgent
import CTraceryShims
import Synchronization
import TraceryCore
import TraceryELF
import TraceryRecord

#if canImport(Glibc)
  import Glibc
#endif

/// The preloaded agent (`libtracery-agent.so`): started before `main` (and before the program's
/// constructors) from `CTraceryAgent`'s `__libc_start_main`, once its own Swift runtime is set up, it
/// attaches the function graph's event recorder to every patchable function of the program and
/// its libraries, and gives each thread its own event file in the trace directory.
///
/// What `tracery record` asks for comes through the environment (`AgentEnvironment`).
///
/// The agent adds one thread to the program: `ChunkPreparer`'s helper, started at the first
/// recorded event, which maps and faults in each event file's next chunk ahead of its thread.
///
/// Threads: a thread's first recorded event creates its file (the recorder's refill). `fork`:
/// the child forgets its parent's files and writes its own under a new session. `exec`: the
/// new image loads the agent again (LD_PRELOAD is inherited) and records under a new session.
enum Agent {
  struct Configuration {
    let directory: String
    /// The directory by a kept descriptor: files are made in it after a chroot too.
    let traceDirectory: TraceDirectory
    let match: String?
    let depth: Int?
    let bufferLimit: Int
    static let chunkSize = EventFile.standardChunkSize
  }

  nonisolated(unsafe) static var configuration: Configuration?
  nonisolated(unsafe) static var session = ""
  nonisolated(unsafe) static var recorder: GraphLink?
  nonisolated(unsafe) static var objects: [TracedProcess.Object] = []
  nonisolated(unsafe) static var tracedFunctions = 0
  nonisolated(unsafe) static var relocatedFunctions = 0
  nonisolated(unsafe) static var trappedFunctions = 0
  nonisolated(unsafe) static var untracedFunctions = 0
  /// The program's GOT slots `record -p --libcall` pointed at stubs, put back at the detach.
  nonisolated(unsafe) static var libraryCallStubs: [LibraryCalls.Stub] = []
  nonisolated(unsafe) static var handlersRegistered = false
  /// Why the recorder could not be attached, if it could not.
  nonisolated(unsafe) static var attachError: String?
  /// Counts recordings in this process (`record -p` attaches and detaches): a thread's file
  /// belongs to the recording it was opened in (`ThreadRecording`).
  nonisolated(unsafe) static var recording: UInt64 = 0

  /// Runs `body` with this thread's recursion guard held: the agent's own calls into traced code
  /// (library functions, when --patch reaches them) are not the program's, and an event written
  /// while the agent changes this thread's file could land in a chunk it has just unmapped.
  static func guarded<T>(_ body: () -> T) -> T {
    let previous = ctracery_swap_guard(1)
    defer { _ = ctracery_swap_guard(previous) }
    return body()
  }

  static func start() {
    guard let environment = AgentEnvironment.current() else { return }
    // Before `main`: only this thread maps memory (a library's constructor may have started
    // others; the reclaimer reads the map again for a thread whose stack it lacks).
    Tracer.withMappingsFixed { start(environment, attaching: false) }
  }

  /// Attaches the recorder as `environment` asks. `attaching`: into a program that is already
  /// running (`record -p`, `attach(settingsPath:)`), whose other threads run meanwhile.
  static func start(_ environment: AgentEnvironment, attaching: Bool) {
    var environment = environment
    let directory = environment.directory
    // Only into a directory of this user's, that is not a symbolic link: another user's (or one
    // others may write) could be made to receive, or redirect, what this program passes around.
    var status = stat()
    guard lstat(directory, &status) == 0, status.st_mode & S_IFMT == S_IFDIR, status.st_uid == geteuid(),
      status.st_mode & 0o022 == 0 || TraceFormat.shared
    else {
      let message =
        "tracery agent: not recording: \(directory) is not a directory of this user's that only it may write\n"
      _ = message.withCString { write(2, $0, strlen($0)) }
      return
    }
    guard let traceDirectory = TraceDirectory(path: directory, blankSlots: environment.blankSlots) else { return }
    let configuration = Configuration(
      directory: directory, traceDirectory: traceDirectory, match: environment.match, depth: environment.depth,
      bufferLimit: environment.bufferLimit)
    self.configuration = configuration
    _ = TimeStampCounter.ticksPerNanosecond
    // (Listing the loaded objects is start-up work a process that relocates nothing skips.)
    let listed =
      environment.relocate || environment.relocateWithoutSites || environment.nestLibraryCalls
      ? ProcessObjects.list().first?.path : nil
    // TRACERY_RELOCATE=auto: relocating when this process's program records no patch site.
    if environment.relocateWithoutSites && !environment.relocate, let listed {
      let records = ELFFile.recordsPatchSites(path: listed) == true
      programRecordsSites = (listed, records)
      environment.relocate = !records
    }
    let main = environment.relocate || environment.nestLibraryCalls ? listed : nil
    let program = environment.relocate ? main : nil
    relocatedProgram = program
    // --patch with relocation, or -l/--nest-libcall, reaches the libraries' functions too (those
    // the glob matches, or all), not only the program's (`mayRelocate(libraryAt:)` says which
    // objects).
    relocatesLibraries = (program != nil && configuration.match != nil) || environment.nestLibraryCalls
    mainProgram = main
    if environment.relocate || environment.nestLibraryCalls { keepEntryPoints(in: directory) }
    EventFile.helperThreadStarts = { _ = ctracery_swap_guard(1) }
    EventFile.makePreparer()
    // Resolving the chosen sites below reads the same table.
    loadTracerSymbols()
    let table = Tracer.shared.symbols
    objects = table.objects.map { TracedProcess.Object(path: $0.path, bias: $0.bias, buildIDBytes: $0.buildID) }
    // --relocate: the program's functions without a site (and with --patch, the libraries'),
    // traced by moving their first instructions out of line (`Tracer.relocatesPrologues`), or
    // those of the program that cannot move by an int3 on their first instruction
    // (`PatchSite.Shape.trap`; a library's are left untraced: the agent's own code calls into
    // libraries, its SIGTRAP handler among it); their site is the entry, or right after its
    // endbr64, which is what their events name.
    let relocatableObjects = Set(
      table.objects.indices.filter {
        table.objects[$0].path == program
          || (relocatesLibraries && mayRelocate(libraryAt: table.objects[$0].path))
      })
    let relocatable = Set(
      table.functions.indices.filter {
        relocatableObjects.contains(table.functions[$0].object) && table.functions[$0].site == nil
          && table.functions[$0].size > 0
          && (table.objects[table.functions[$0].object].path == program || !Self.leftUntraced(table.functions[$0].name))
      })
    func site(_ index: Int) -> UInt64? {
      guard relocatable.contains(index) else { return table.functions[index].site }
      return PatchSite.afterEndbr64(table.functions[index].address)
    }
    saveSymbols(table, in: directory, site: site)
    var chosen = table.patchableFunctions + relocatable.sorted()
    if let match = configuration.match, let glob = try? Glob(match) {
      // By any of its names (symbol, demangled, without parameters, simple), as readers show them.
      chosen = chosen.filter { Demangler.anyForm(of: table.functions[$0].name, matches: glob.matches) }
    }
    // Sites in no named function (a stripped program's): traced too, named by address
    // (`saveSymbols`), unless --patch chose by name.
    let anonymous = configuration.match == nil ? table.orphanSites.map(\.address) : []
    let sites = chosen.compactMap { relocatable.contains($0) ? nil : table.functions[$0].site } + anonymous
    // gcc's 1-byte NOP sleds can be rewritten now: the agent starts before other threads (unless a
    // library's constructor started one). In a running program a thread may be stopped between
    // two of those NOPs: there they are moved out of line like a prologue (five NOPs and a jump
    // back, `Tracer.relocatesPrologues`), which moves such a thread to the copy (and, as no int3
    // sites are made there, a sled that cannot be moved stays untraced).
    let sleds = sites.filter { site in
      if case .nopSled = ProcessObjects.shape(at: site) { true } else { false }
    }
    if !sleds.isEmpty, !attaching { _ = TextPatcher.shared.convertSleds(sleds) }
    let movesSleds = attaching && !sleds.isEmpty
    // A relocated function is named by its entry (the tracer finds its size there).
    var addresses = sites + chosen.filter(relocatable.contains).map { table.functions[$0].address }
    // --libcall: the program's PLT calls, through stubs whose NOPs are sites like any other.
    if environment.libraryCalls, let main = ProcessObjects.list().first {
      // Functions traced anyway keep their slots (a slot holds the function's entry; its site is
      // the entry or just after an endbr64).
      let traced = Set(chosen.map { table.functions[$0].address })
      let stubs =
        (try? LibraryCalls.install(
          path: main.path, bias: main.bias, traced: traced.contains)) ?? []
      if attaching { libraryCallStubs = stubs }
      let glob = configuration.match.flatMap { try? Glob($0) }
      let chosenStubs = stubs.filter { stub in
        glob.map { $0.matches(stub.name) || $0.matches(stub.name + "@plt") } ?? true
      }
      if !chosenStubs.isEmpty {
        saveLibraryCallNames(chosenStubs, in: directory)
        addresses += chosenStubs.map(\.site)
      }
    }
    if !handlersRegistered {
      handlersRegistered = true
      pthread_atfork(nil, nil) { Agent.afterFork() }
      atexit(Agent.atExit)
    }
    // The process file says what was traced, so it is written after the attach (before the
    // program runs, hence before any thread's first event appends to it). In a running program
    // threads record as soon as the batch is done, and their first events name the session and
    // append to the file: it is written first, and what was traced appended (the last line of a
    // key is the one readers keep).
    if attaching {
      writeProcessInfo()
      allowRefills()
    }
    defer {
      if attaching {
        appendToProcessFile(
          "traced-functions \(tracedFunctions)\nrelocated-functions \(relocatedFunctions)\n"
            + "trapped-functions \(trappedFunctions)\nuntraced-functions \(untracedFunctions)")
      } else {
        writeProcessInfo()
      }
    }
    // (Set up even when nothing is traced yet: -l --patch may name only what `dlopen` loads later.)
    Tracer.unwoundHandler = Agent.unwound
    Tracer.shared.relocatesPrologues = environment.relocate || movesSleds || relocatesLibraries
    // In a running program a thread may block SIGTRAP (the agent keeps it deliverable only when
    // preloaded): no int3 sites there; what cannot be relocated stays untraced.
    Tracer.shared.usesTrapSites = !attaching
    Tracer.shared.trapSiteObjects = relocatesLibraries ? Set(program.map { [$0] } ?? []) : nil
    tracesJitCalls = environment.jitCalls
    guard !addresses.isEmpty else { return }
    traceOnlyFromKnownCode()
    do {
      recorder = try Tracer.shared.attachGraph(
        .recorder(refill: Agent.refill), to: .addresses(addresses), depthLimit: configuration.depth)
    } catch {
      attachError = "\(error)"
    }
    for (index, object) in table.objects.enumerated() {
      objectSites[objectKey(object.path, object.bias)] =
        chosen.filter { table.functions[$0].object == index }.compactMap { site($0) }
    }
    let shapes = Tracer.shared.siteShapes
    tracedFunctions = shapes.values.reduce(0, +)
    relocatedFunctions = shapes[.relocated] ?? 0
    trappedFunctions = shapes[.trap] ?? 0
    untracedFunctions = addresses.count - tracedFunctions
    let specs = ValueRecorder.specs(environment)
    if recorder != nil, !specs.isEmpty {
      let functions = chosen.compactMap { index in site(index).map { (name: table.functions[index].name, site: $0) } }
      ValueRecorder.attach(specs, kind: environment.patternKind, functions: functions, depth: configuration.depth)
    }
  }

  /// Saves the names of each object's patchable functions in `DIR/symbols` (once per object and
  /// trace: a later process that loads the same object finds its file there) and names the file
  /// in `objects`. Written under a private name and renamed, so a reader never sees half a file.
  static func saveSymbols(_ table: SymbolTable, in directory: String, site: (Int) -> UInt64?) {
    for (index, key) in symbolFiles(table, in: directory, site: site) { objects[index].symbols = key }
  }

  /// Writes the symbol files of `table`'s objects that have sites; returns each one's key by
  /// object index.
  static func symbolFiles(_ table: SymbolTable, in directory: String, site: (Int) -> UInt64?) -> [Int: String] {
    var keys: [Int: String] = [:]
    var sites = [[(site: UInt64, name: String)]](repeating: [], count: table.objects.count)
    for (index, function) in table.functions.enumerated() {
      guard let site = site(index) else { continue }
      sites[function.object].append((site &- table.objects[function.object].bias, function.name))
    }
    // A site in no named function (a stripped object): OBJECT+0xADDRESS (link-time).
    for (object, address) in table.orphanSites {
      let link = address &- table.objects[object].bias
      let file = table.objects[object].path.split(separator: "/").last.map(String.init) ?? "?"
      sites[object].append((link, "\(file)+0x\(String(link, radix: 16))"))
    }
    for (index, object) in table.objects.enumerated() where !sites[index].isEmpty {
      let identity = FileIdentity(path: object.path)
      let buildID = object.buildID.map(TracedProcess.Object.hex)
      guard let key = SymbolFile.key(buildID: buildID, identity: identity) else { continue }
      keys[index] = key
      writeOnce("\(key).sym", in: directory) {
        Array(SymbolFile(path: object.path, buildID: buildID, identity: identity, sites: sites[index]).text.utf8)
      }
    }
    return keys
  }

  /// Writes `DIR/symbols/NAME` unless an earlier process of the trace did (the folder made if
  /// need be): the bytes `make` gives, under a private name renamed into place, so a reader
  /// never sees half a file. Symbol files, kept entry points and library-call names are each
  /// written once per trace this way.
  static func writeOnce(_ name: String, in directory: String, _ make: () -> [UInt8]) {
    let folder = directory + "/symbols"
    let path = "\(folder)/\(name)"
    guard access(path, F_OK) != 0 else { return }
    mkdir(folder, TraceFormat.directoryMode)
    Files.writeReplacing(make(), at: path)
  }

  /// Keeps each object's entry points (the sweep of its code that relocation needs) beside the
  /// trace's symbol files, by file identity (device, inode, size, modification time): a later
  /// process of the same program reads them instead of decoding all its code again. Written
  /// under a private name and renamed, like the symbol files; a file that does not read back
  /// whole is swept again (`EntryPoints(encoded:bias:)`).
  static func keepEntryPoints(in directory: String) {
    @Sendable func name(_ path: String) -> String? {
      SymbolFile.key(buildID: nil, identity: FileIdentity(path: path)).map { "\($0).entries" }
    }
    EntryPoints.persistence = (
      load: { path in name(path).flatMap { Files.read("\(directory)/symbols/\($0)") } },
      store: { path, bytes in
        guard let name = name(path) else { return }
        writeOnce(name, in: directory) { bytes }
      }
    )
  }

  /// Names the library-call stubs (`NAME@plt`) in a symbol file of their own, listed in the
  /// process file as the object `[library calls]`, whose bias is the stubs' block: its sites are
  /// offsets in it, so the file says only which imports in which order, and is named by a digest
  /// of its text. Every later process of the same program finds it written (a file created per
  /// process was ~0.2 ms of each traced child's start here).
  static func saveLibraryCallNames(_ stubs: [LibraryCalls.Stub], in directory: String) {
    let base = stubs.map(\.site).min() ?? 0
    let file = SymbolFile(
      path: "[library calls]", buildID: nil, identity: nil, sites: stubs.map { ($0.site - base, $0.name + "@plt") })
    let text = Array(file.text.utf8)
    // FNV-1a, 64 bits.
    let digest = text.reduce(0xcbf2_9ce4_8422_2325 as UInt64) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 }
    let key = "libcalls-" + String(digest, radix: 16)
    writeOnce("\(key).sym", in: directory) { text }
    objects.append(TracedProcess.Object(path: "[library calls]", bias: base, buildID: nil, symbols: key))
  }

  // MARK: - dlopen and dlclose

  /// The sites traced per loaded object ("BIAS PATH"), for `dlclose`.
  nonisolated(unsafe) static var objectSites: [String: [UInt64]] = [:]
  /// Serialises `loaded` and `unloading` (any thread may call `dlopen`).
  nonisolated(unsafe) static let loadLock: UnsafeMutablePointer<pthread_mutex_t> = {
    let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    pthread_mutex_init(lock, nil)
    return lock
  }()

  static func objectKey(_ path: String, _ bias: UInt64) -> String { "\(bias) \(path)" }

  /// The program, when its functions without a site are traced too (--relocate).
  nonisolated(unsafe) static var relocatedProgram: String?

  /// Whether the program records patch sites, when the start asked (TRACERY_RELOCATE=auto).
  /// Set before the tracer's table is first loaded, like `relocatedProgram`.
  nonisolated(unsafe) static var programRecordsSites: (path: String, records: Bool)?

  /// Whether the object at `path` records patch sites (its section headers read, except for a
  /// program the start already asked about).
  static func recordsPatchSites(_ path: String) -> Bool {
    if let known = programRecordsSites, known.path == path { return known.records }
    return ELFFile.recordsPatchSites(path: path) == true
  }

  /// The tracer's table: the objects that record patch sites only (read from their section
  /// headers first), and the program itself with --relocate (a stripped program's functions then
  /// come from its call frames). At start, and again when `dlopen` or `dlclose` change the set.
  static func loadTracerSymbols() {
    let program = relocatedProgram
    let libraries = relocatesLibraries
    Tracer.shared.loadSymbols(
      including: {
        // (The program relocated first: its section headers need not be read for the answer.)
        $0.path == program || recordsPatchSites($0.path)
          || (libraries && mayRelocate(libraryAt: $0.path))
      },
      unnamed: { $0.path == program })
  }

  /// Whether `relocatesLibraries` may move functions of the object at `path`: any but the
  /// program (its own functions follow --relocate), the agent itself, the dynamic loader (it runs
  /// before a thread's state exists, and to bind the agent's own calls), and the unwinder the
  /// agent wraps (libgcc_s).
  static func mayRelocate(libraryAt path: String) -> Bool {
    let name = path.split(separator: "/").last.map(String.init) ?? path
    return path != mainProgram && path != agentPath && !name.hasPrefix("ld-linux") && !name.hasPrefix("libgcc_s.")
  }

  /// The program's own file (the first loaded object).
  nonisolated(unsafe) static var mainProgram: String?

  /// Library functions --patch and -l never reach: those that return twice (their second return
  /// would come back through a frame the first one ended: a program printed another sum after a
  /// `longjmp` to its `setjmp`); those whose child runs on the caller's stack and thread state
  /// (`vfork`, the `clone` family under `posix_spawn`); `_Fork`, the system call inside `fork`,
  /// whose child returns before the agent's fork handler gives it files of its own (its exit
  /// event landed in the parent's chunk: the two are shared mappings); and the machinery that
  /// exceptions run through: the unwinder's and the C++ runtime's entry points, which the agent
  /// wraps, and the loader's lookups (`dl*`, `_dl_*`: their errors leave by `longjmp`), which
  /// the unwinder and those wrappers call (a C++ program crashed in a throw). And
  /// `__ctype_init`, which every new thread runs before its own function: the agent's helper
  /// thread (whose guard is held from its function on) showed up as a thread of the program.
  static func leftUntraced(_ name: String) -> Bool {
    let base = name.split(separator: "@").first.map(String.init) ?? name
    return [
      "setjmp", "_setjmp", "__setjmp", "sigsetjmp", "__sigsetjmp", "getcontext", "__getcontext", "vfork", "__vfork",
      "clone", "__clone", "clone3", "__clone3", "__clone_internal", "_Fork", "__ctype_init",
    ].contains(base) || base.hasPrefix("_Unwind_") || base.hasPrefix("__cxa_") || base.hasPrefix("__gxx_personality")
      || base.hasPrefix("dl") || base.hasPrefix("_dl_")
  }

  /// This library's path: the file mapped where its code is.
  static let agentPath: String? = {
    let address = UInt(bitPattern: unsafeBitCast(Agent.refill, to: UnsafeRawPointer.self))
    guard let maps = Files.read("/proc/self/maps") else { return nil }
    for line in String(decoding: maps, as: UTF8.self).split(separator: "\n") {
      let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
      let range = fields.first?.split(separator: "-") ?? []
      guard fields.count == 6, range.count == 2, let low = UInt(range[0], radix: 16),
        let high = UInt(range[1], radix: 16), (low..<high).contains(address)
      else { continue }
      return String(fields[5].drop(while: { $0 == " " }))
    }
    return nil
  }()

  /// The libraries' functions are traced too, relocated (--patch with relocation, or
  /// -l/--nest-libcall): see `start`.
  nonisolated(unsafe) static var relocatesLibraries = false

  /// --jit-calls: calls from a JIT's code are traced too (`traceOnlyFromKnownCode` does nothing).
  nonisolated(unsafe) static var tracesJitCalls = false

  /// Before the recorder's first attach: a JIT's code (anonymous memory; V8's builtins in node's
  /// own text) walks its frames and dies on a return address that is not its code's, so calls
  /// from it stay untraced (`KnownCode`), unless asked for (--jit-calls). The builtins are found
  /// by the relocating start's entry points (a program with patch sites is not swept for them).
  static func traceOnlyFromKnownCode() {
    guard !tracesJitCalls else { return }
    Tracer.shared.traceGraphCallsOnlyFromKnownCode(
      excludingForeignRunOf: relocatedProgram, first: UInt64(ctracery_getauxval(9)))  // 9: AT_ENTRY
  }

  /// After a `dlopen` that succeeded (CTraceryAgent interposes it), before it returns to the
  /// program: objects loaded since the agent last looked that record patch sites are traced from
  /// now on (their constructors, which ran inside `dlopen`, are not), named like the others (a
  /// symbol file, an `object` line appended to the process file).
  static func loaded() {
    // The new object's code is known from now on (before its functions are traced).
    Tracer.shared.refreshKnownCode()
    guard let configuration, recorder != nil || !objects.isEmpty else { return }
    pthread_mutex_lock(loadLock)
    defer { pthread_mutex_unlock(loadLock) }
    let known = Set(objects.map { objectKey($0.path, $0.bias) })
    let fresh = ProcessObjects.list().filter {
      !known.contains(objectKey($0.path, $0.bias))
        && (recordsPatchSites($0.path) || (relocatesLibraries && mayRelocate(libraryAt: $0.path)))
    }
    guard !fresh.isEmpty else { return }
    // The tracer's table must name the new functions too: reloaded, it is also where they are read.
    loadTracerSymbols()
    let table = Tracer.shared.symbols
    let freshKeys = Set(fresh.map { objectKey($0.path, $0.bias) })
    let freshObjects = Set(
      table.objects.indices.filter { freshKeys.contains(objectKey(table.objects[$0].path, table.objects[$0].bias)) })
    // As at the start: the --patch glob chooses; a function without a site is relocated when
    // --patch reaches libraries (named by its entry, its events by the site after any endbr64).
    let glob = configuration.match.flatMap { try? Glob($0) }
    func site(_ index: Int) -> (site: UInt64, address: UInt64)? {
      let function = table.functions[index]
      guard freshObjects.contains(function.object) else { return nil }
      if let glob, !Demangler.anyForm(of: function.name, matches: glob.matches) { return nil }
      if let site = function.site { return (site, site) }
      guard relocatesLibraries, function.size > 0, !leftUntraced(function.name) else { return nil }
      return (PatchSite.afterEndbr64(function.address), function.address)
    }
    let keys = symbolFiles(table, in: configuration.directory) { site($0)?.site }
    var addresses: [UInt64] = []
    for (index, object) in table.objects.enumerated() where freshObjects.contains(index) {
      var entry = TracedProcess.Object(path: object.path, bias: object.bias, buildIDBytes: object.buildID)
      entry.symbols = keys[index]
      objects.append(entry)
      appendToProcessFile(entry.line)
      let chosen = table.functions.indices.filter { table.functions[$0].object == index }.compactMap(site)
      let orphans = glob == nil ? table.orphanSites.filter { $0.object == index }.map(\.address) : []
      objectSites[objectKey(object.path, object.bias)] = chosen.map(\.site) + orphans
      addresses += chosen.map(\.address) + orphans
    }
    guard !addresses.isEmpty else { return }
    if let recorder {
      _ = try? recorder.add(.addresses(addresses))
    } else {
      traceOnlyFromKnownCode()
      recorder = try? Tracer.shared.attachGraph(
        .recorder(refill: Agent.refill), to: .addresses(addresses), depthLimit: configuration.depth)
    }
  }

  /// Before a `dlclose` of the object at `path` (bias `bias`): its sites leave the recorder, since
  /// the object may be unmapped; `stillLoaded` after the call puts them back when it was not.
  static func unloading(path: String, bias: UInt64) {
    guard let recorder else { return }
    pthread_mutex_lock(loadLock)
    defer { pthread_mutex_unlock(loadLock) }
    guard let sites = objectSites[objectKey(path, bias)], !sites.isEmpty else { return }
    recorder.remove(sites: sites)
  }

  /// After that `dlclose`: an object still loaded (its handle was counted more than once) is
  /// traced again; one gone is forgotten (another object may be loaded at its address later).
  static func unloaded(path: String, bias: UInt64) {
    Tracer.shared.refreshKnownCode()
    guard let recorder else { return }
    pthread_mutex_lock(loadLock)
    defer { pthread_mutex_unlock(loadLock) }
    let key = objectKey(path, bias)
    guard let sites = objectSites[key], !sites.isEmpty else { return }
    if ProcessObjects.list().contains(where: { objectKey($0.path, $0.bias) == key }) {
      _ = try? recorder.add(.addresses(sites))
    } else {
      objectSites[key] = nil
      objects.removeAll { objectKey($0.path, $0.bias) == key }
      loadTracerSymbols()
    }
  }

  /// The pid `writeProcessInfo` last named a session for (this process's, unless it is a vfork
  /// child running in its parent's memory).
  nonisolated(unsafe) static var sessionPid: pid_t = 0

  /// Claims a new session name (`PID.N`, N counting this pid's images) and writes its process file.
  static func writeProcessInfo() {
    guard let configuration else { return }
    let pid = getpid()
    sessionPid = pid
    var generation = 0
    // (In a fork child: the parent's, inherited, is not this process's.)
    processFile?.close()
    processFile = nil
    var created: CheckedFile?
    while true {
      // Kept open for the lines appended later (they land after a chroot or a privilege drop
      // too), opened again (appending) when the program closed it.
      created = configuration.traceDirectory.create(
        "process-\(pid).\(generation).info", flags: O_WRONLY, reopenFlags: O_WRONLY | O_APPEND)
      if created != nil { break }
      guard errno == EEXIST, generation < 1000 else { return }
      generation += 1
    }
    guard let created else { return }
    session = "\(pid).\(generation)"
    let arguments =
      Files.read("/proc/thread-self/cmdline").map { bytes in
        bytes.split(separator: 0, omittingEmptySubsequences: false).dropLast().map {
          String(decoding: $0, as: UTF8.self)
        }
      } ?? []
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    var info = TracedProcess(
      session: session, pid: pid, parent: getppid(), executable: resolvedExecutable(), arguments: arguments,
      ticksPerNanosecond: TimeStampCounter.ticksPerNanosecond, startTicks: TimeStampCounter.now,
      startRealtimeNanoseconds: UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec), objects: objects,
      tracedFunctions: tracedFunctions)
    info.relocatedFunctions = relocatedFunctions
    info.trappedFunctions = trappedFunctions
    info.untracedFunctions = untracedFunctions
    _ = created.withDescriptor { fd -> Bool in
      Files.write(Array(info.text.utf8), toDescriptor: fd)
      return fcntl(fd, F_SETFL, O_APPEND) == 0
    }
    processFile = created
  }

  static func resolvedExecutable() -> String { ProcessObjects.executableLink ?? "?" }

  /// In the child of a fork: the parent's files are not ours; start a session of our own.
  static func afterFork() {
    let guardHeld = ctracery_swap_guard(1)
    defer { _ = ctracery_swap_guard(guardHeld) }
    // Locks other threads of the parent may have held at the fork, before this child uses them.
    configuration?.traceDirectory.forkedChild()
    processFile?.forkedChild()
    let state = ctracery_thread_state()!
    state.pointee.owner = 0
    state.pointee.event_cursor = 0
    state.pointee.event_end = 0
    writeProcessInfo()
  }

  /// The recorder's refill: called by generated code (recursion guard held, every register
  /// saved) when this thread's chunk is full, or on its first event.
  static let refill: @convention(c) () -> Void = {
    // While `record -p` changes what is read here, the event is dropped (counted by the caller).
    guard enterRefill() else { return }
    defer { leaveRefill() }
    let state = ctracery_thread_state()!
    if sandboxed {
      // No system call: the current chunk is used to its end (its pages fault in), then events
      // are dropped and counted; a thread without a file drops them uncounted.
      guard state.pointee.owner > 1 else { return }
      let file = ThreadRecording.of(state).file
      if file.chunkEnd != 0, state.pointee.event_end < file.chunkEnd - 8 {
        state.pointee.event_end = file.chunkEnd - 8
      } else {
        file.countDropped()
      }
      return
    }
    if state.pointee.owner > 1, ThreadRecording.of(state).recording != Agent.recording {
      // A file of an earlier recording (`record -p` detached since; `forceRefills` sent this
      // thread here): closed by its own thread. Its last events were the exits of calls that
      // recording saw begin.
      let earlier = ThreadRecording.take(state.pointee.owner)
      earlier.countUntraced(state)
      _ = earlier.file.close(cursor: state.pointee.event_cursor)
      state.pointee.owner = 0
      state.pointee.event_cursor = 0
      state.pointee.event_end = 0
    }
    let file: EventFile
    if state.pointee.owner == 0 {
      // Not recording (detached): nothing to write to; the event is dropped.
      guard let configuration = Agent.configuration else { return }
      // (When the program has dropped its privileges: a spare file made before, if one is left.)
      guard
        let created = EventFile(
          in: configuration.traceDirectory, name: "\(Agent.session)-\(ctracery_gettid()).events", pid: getpid(),
          tid: ctracery_gettid(), chunkSize: Configuration.chunkSize, limit: configuration.bufferLimit)
          ?? takeSpareFile()
      else {
        state.pointee.owner = 1  // no file: this thread's events are dropped (counted in its state)
        // (Readers say so: the program dropped its privileges, say, before this thread began.)
        appendToProcessFile("thread-unrecorded \(ctracery_gettid())")
        return
      }
      let owner = ThreadRecording(file: created, recording: Agent.recording, state: state)
      state.pointee.owner = UInt64(UInt(bitPattern: Unmanaged.passRetained(owner).toOpaque()))
      pthread_setspecific(Agent.threadKey, UnsafeRawPointer(bitPattern: 1))
      // The process file lists its threads: a reader tells a deleted thread file from one
      // never written.
      appendToProcessFile("thread \(ctracery_gettid())")
      file = created
    } else if state.pointee.owner == 1 {
      return
    } else {
      file = ThreadRecording.of(state).file
    }
    // The recorder writes while cursor < end: 8 bytes short of the chunk's end leaves room for a
    // 16-byte entry (the reader skips a chunk's last 8 bytes when they are zero). In a thread's
    // first chunk `end` is first set half way: the refill there asks for the second chunk to be
    // prepared and moves it on. Every later chunk asks for the next one as soon as it is taken
    // (the helper needs ~0.9 ms for a chunk; half a chunk of calls is ~0.3 ms: too short).
    let chunkEnd = file.chunkEnd
    if chunkEnd != 0, state.pointee.event_end < chunkEnd - 8 {
      file.prepareNext()
      state.pointee.event_end = chunkEnd - 8
    } else if let chunk = file.nextChunk(leaving: state.pointee.event_cursor) {
      let start = UInt64(UInt(bitPattern: chunk.baseAddress))
      state.pointee.event_cursor = start + UInt64(ChunkSeal.size)
      // A new chunk: the recorder's reservation in the old one is void, even where the new
      // chunk's mapping follows the old one's and the cursor looks as if it stood
      // (GraphEmitter's `putRecord`).
      state.pointee.event_mark = 0
      if file.chunksTaken == 1 {
        state.pointee.event_end = start + UInt64(chunk.count / 2)
      } else {
        file.prepareNext()
        state.pointee.event_end = start + UInt64(chunk.count - 8)
      }
    } else if !file.isFinished {
      // (After the exiting thread's recording ended, calls the exit handlers run after the
      // agent's make are not losses: the trace ends where the process's recording did.)
      file.countDropped()
    }
  }

  /// A call a caught exception unwound: its exit event, written as the recorder writes one, at
  /// the time of the catch (so the trace stays balanced, as uftrace's does). Every frame in this
  /// process is one the recorder took, unless it is at or below the depth limit (the value
  /// recorder, on a subset of the same functions, declines those too).
  static let unwound: UnwoundHandler = { frame in
    let depth = frame.pointee.depth
    guard Agent.enterRefill() else { return }
    let limit = Agent.configuration?.depth
    Agent.leaveRefill()
    if let limit, depth >= UInt64(max(0, limit)) { return }
    let state = ctracery_thread_state()!
    if state.pointee.event_cursor >= state.pointee.event_end { Agent.refill() }
    guard state.pointee.event_cursor < state.pointee.event_end else {
      state.pointee.dropped += 1
      return
    }
    let word = EventWord(kind: EventWord.exitKind, depth: Int(truncatingIfNeeded: depth), low: TimeStampCounter.now).raw
    UnsafeMutablePointer<UInt64>(bitPattern: UInt(state.pointee.event_cursor))!.pointee = word
    state.pointee.event_cursor += 8
  }

  /// Closes a thread's file when it exits.
  static let threadKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { _ in
      let guardHeld = ctracery_swap_guard(1)
      defer { _ = ctracery_swap_guard(guardHeld) }
      Agent.waitToEnterRefill()
      defer { Agent.leaveRefill() }
      let state = ctracery_thread_state()!
      let owner = state.pointee.owner
      let cursor = state.pointee.event_cursor
      state.pointee.owner = 1
      state.pointee.event_cursor = 0
      state.pointee.event_end = 0
      guard owner > 1 else { return }
      let thread = ThreadRecording.take(owner)
      thread.countUntraced(state)
      // Sandboxed: sealed in place, no system call (the file stays mapped and open).
      guard !Agent.sandboxed else {
        thread.file.finish(cursor: cursor, unmapping: false)
        return
      }
      let end = thread.file.close(cursor: cursor)
      // (A file of an earlier recording is not listed in this one's process file.)
      if thread.recording == Agent.recording { Agent.appendToProcessFile("thread-end \(ctracery_gettid()) \(end)") }
    }
    return key
  }()
}

extension Agent {
  /// Whether the program installed a seccomp filter (`enterSandbox`).
  static var sandboxed: Bool { ctracery_sandboxed().pointee != 0 }

  /// Just before the program installs a seccomp filter (`prctl(PR_SET_SECCOMP)` or the
  /// `seccomp` system call through `syscall`: the agent's interposers; a filter installed by
  /// other means is not seen): the filter may kill the process for any system call it does not
  /// list (OpenSSH's and browsers' sandboxes do), and the agent's are not the program's. From
  /// here on the agent makes none in this process: the process file says so now; refills and
  /// set-ups are drawn from no more (each thread writes to the end of the chunk it has, then
  /// its events are dropped and counted; threads not yet recording are not traced); the helper
  /// is left idle; exits seal in place; objects loaded later are not traced. Refills in flight
  /// and the helper's jobs finish first.
  static func enterSandbox() {
    guard !sandboxed else { return }
    appendToProcessFile("sandboxed \(ctracery_gettid())")
    stopRefills()
    EventFile.quiesceHelper()
    ctracery_sandboxed().pointee = 1
    allowRefills()
  }

  /// Event files made before the program dropped its privileges, for threads that begin after
  /// (`prepareSpareFiles`). Protocol, without a lock (a fork child must not find one held by a
  /// thread it does not have): `spareFiles` and `sparesOwner` are written by the thread that
  /// changes the user (the program makes one such call at a time) before `sparesReady` is stored
  /// (releasing); takers load `sparesReady` (acquiring) and claim an index with `sparesTaken`.
  /// Spares belong to the process that made them: a fork child has others' (`sparesOwner`).
  nonisolated(unsafe) static var spareFiles: [EventFile] = []
  nonisolated(unsafe) static var sparesOwner: Int32 = 0
  static let sparesReady = Atomic<Int>(0)
  static let sparesTaken = Atomic<Int>(0)
  static let spareCount = 16

  /// Just before a program running as root changes its effective user to another (the agent's
  /// `setuid`/`seteuid`/`setreuid`/`setresuid`): the trace directory is root's (0700), so threads
  /// that begin after could make no file. `spareCount` files are made now
  /// (`SESSION-spareN.events`, thread id 0 in the header); a thread that cannot make its own
  /// takes one (`takeSpareFile`) and writes its id into it; readers skip those never taken.
  static func prepareSpareFiles() {
    guard let configuration, !sandboxed, sparesOwner != getpid() else { return }
    sparesReady.store(0, ordering: .releasing)
    var made: [EventFile] = []
    for index in 0..<spareCount {
      guard
        let file = EventFile(
          in: configuration.traceDirectory, name: "\(session)-spare\(index).events", pid: getpid(), tid: 0,
          chunkSize: Configuration.chunkSize, limit: configuration.bufferLimit)
      else { break }
      made.append(file)
    }
    spareFiles = made
    sparesOwner = getpid()
    sparesTaken.store(0, ordering: .relaxed)
    sparesReady.store(made.count, ordering: .releasing)
  }

  /// A spare file for this thread (its id written in it), or nil when none is left.
  static func takeSpareFile() -> EventFile? {
    let ready = sparesReady.load(ordering: .acquiring)
    guard ready > 0, sparesOwner == getpid() else { return nil }
    let index = sparesTaken.add(1, ordering: .relaxed).oldValue
    guard index < ready else { return nil }
    let file = spareFiles[index]
    file.adopt(tid: ctracery_gettid())
    return file
  }

  /// The process file of this session (made by `writeProcessInfo`).
  nonisolated(unsafe) static var processFile: CheckedFile?

  /// Appends one line to the process file (one write with O_APPEND: lines of several threads do
  /// not interleave).
  static func appendToProcessFile(_ line: String) {
    guard let processFile else { return }
    let text = line + "\n"
    _ = processFile.withDescriptor { fd in Files.write(Array(text.utf8), toDescriptor: fd) }
  }

  nonisolated(unsafe) static var exited = false

  /// The process leaves without `exit` (the `_exit` interposer): what `atExit` does, unless this
  /// is a vfork child (another pid than the session's) sharing its parent's memory, whose exit
  /// must leave the parent's state as it is. Sandboxed, nothing (its chunks stay open, as when
  /// killed): telling a vfork child apart takes a system call the filter may not allow. Nor
  /// inside a signal handler, as `atExit`.
  static func exiting() {
    guard configuration != nil, !sandboxed, sessionPid == getpid(), !inSignalHandler() else { return }
    sealAtExit()
  }

  /// Whether this thread runs a signal handler (`tracery_agent_in_signal_handler`, then the
  /// traced calls' real return addresses).
  static func inSignalHandler() -> Bool {
    var restorer: UInt64 = 0
    return tracery_agent_in_signal_handler(&restorer) != 0 || (restorer != 0 && Tracer.aTracedCallReturns(to: restorer))
  }

  /// At exit (atexit, registered at start): seals the exiting thread's chunk and the chunks the
  /// helper has not sealed yet, and writes `thread-end` and `end` in the process file, so that
  /// readers can check what was written and know the process was not killed. The exiting thread
  /// records nothing after this (its later events are dropped, not counted); threads still running
  /// keep their last chunk open (readers check its events one by one).
  ///
  /// Not when `exit` was called from a signal handler (common, though not async-signal-safe):
  /// the sealing allocates, and the handler may have interrupted malloc, which the program's own
  /// exit might not need; the process then ends unsealed, as when killed. (Sandboxed, no look:
  /// it takes system calls.)
  static let atExit: @convention(c) () -> Void = {
    guard sandboxed || !inSignalHandler() else { return }
    sealAtExit()
  }

  static func sealAtExit() {
    // Once: a program's atexit handler may end the process by `_exit` before this one runs.
    guard !exited else { return }
    exited = true
    let guardHeld = ctracery_swap_guard(1)
    defer { _ = ctracery_swap_guard(guardHeld) }
    waitToEnterRefill()
    defer { leaveRefill() }
    let state = ctracery_thread_state()!
    // (Sandboxed: sealed in place and nothing else, no system call.)
    if state.pointee.owner > 1 {
      let thread = ThreadRecording.of(state)
      thread.countUntraced(state)
      let end = thread.file.finish(cursor: state.pointee.event_cursor, unmapping: !sandboxed)
      state.pointee.event_cursor = 0
      state.pointee.event_end = 0
      if !sandboxed, thread.recording == recording { appendToProcessFile("thread-end \(ctracery_gettid()) \(end)") }
    }
    guard !sandboxed else { return }
    EventFile.sealLeftChunks()
    appendToProcessFile("end")
  }
}

// The agent's entry points run with the thread's recursion guard held (`Agent.guarded`).

@_cdecl("tracery_agent_start")
public func traceryAgentStart() { Agent.guarded { Agent.start() } }

// (Sandboxed, objects loaded or unloaded later are left as they are: patching takes system calls.)
@_cdecl("tracery_agent_loaded")
public func traceryAgentLoaded() {
  guard !Agent.sandboxed else { return }
  Agent.guarded { Agent.loaded() }
}

@_cdecl("tracery_agent_unloading")
public func traceryAgentUnloading(_ name: UnsafePointer<CChar>, _ bias: UInt) {
  guard !Agent.sandboxed else { return }
  Agent.guarded { Agent.unloading(path: ProcessObjects.path(ofLoaded: String(cString: name)), bias: UInt64(bias)) }
}

@_cdecl("tracery_agent_unloaded")
public func traceryAgentUnloaded(_ name: UnsafePointer<CChar>, _ bias: UInt) {
  guard !Agent.sandboxed else { return }
  Agent.guarded { Agent.unloaded(path: ProcessObjects.path(ofLoaded: String(cString: name)), bias: UInt64(bias)) }
}

@_cdecl("tracery_agent_sandboxing")
public func traceryAgentSandboxing() { Agent.guarded { Agent.enterSandbox() } }

@_cdecl("tracery_agent_dropping")
public func traceryAgentDropping() { Agent.guarded { Agent.prepareSpareFiles() } }

@_cdecl("tracery_agent_exiting")
public func traceryAgentExiting() { Agent.exiting() }

/// A thread's event file (its `ctracery_thread.owner` word holds one, retained) and the
/// recording it belongs to.
final class ThreadRecording {
  let file: EventFile
  let recording: UInt64
  /// The thread's counts, when the file began, of calls its full shadow stack left untraced and
  /// of calls from unknown code (`ctracery_thread.foreign_calls`).
  let overflowedBefore: UInt64
  let foreignBefore: UInt64

  init(file: EventFile, recording: UInt64, state: UnsafeMutablePointer<ctracery_thread>) {
    self.file = file
    self.recording = recording
    self.overflowedBefore = state.pointee.overflowed
    self.foreignBefore = state.pointee.foreign_calls
  }

  /// Counts in the file's header the calls the thread left untraced since the file began: those
  /// its full shadow stack refused (65,535 frames deep), as dropped events (an entry and an exit
  /// each), and those from unknown code (a JIT's), which the recording does not ask for (`record
  /// --jit-calls` does). Called by the owning thread before its file is finished.
  func countUntraced(_ state: UnsafeMutablePointer<ctracery_thread>) {
    let calls = state.pointee.overflowed &- overflowedBefore
    if calls > 0, calls < 1 << 62 { file.countDropped(2 * calls) }
    file.setForeignCalls(state.pointee.foreign_calls &- foreignBefore)
  }

  /// The owner of `state` (its owner word must hold one: > 1).
  static func of(_ state: UnsafeMutablePointer<ctracery_thread>) -> ThreadRecording {
    Unmanaged.fromOpaque(UnsafeRawPointer(bitPattern: UInt(state.pointee.owner))!).takeUnretainedValue()
  }

  /// The one an owner word holds (> 1), taking the word's reference (the word is cleared next).
  static func take(_ owner: UInt64) -> ThreadRecording {
    Unmanaged.fromOpaque(UnsafeRawPointer(bitPattern: UInt(owner))!).takeRetainedValue()
  }
}
