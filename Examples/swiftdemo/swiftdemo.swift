// A Swift program for `tracery record --relocate` (swiftc has no patchable-entry flag: every
// function is traced through its relocated prologue or an int3). Build as it would ship:
//
//     swiftc -O -parse-as-library Examples/swiftdemo/swiftdemo.swift -o swiftdemo
//     tracery record --relocate -- ./swiftdemo && tracery replay
//
// Generics, protocols with existential calls, closures, async/await on a few tasks, a thrown
// error, a function returning three words (rax, rdx, rcx).
protocol Shape { func area() -> Double }
struct Square: Shape { let side: Double; func area() -> Double { side * side } }
struct Circle: Shape { let radius: Double; func area() -> Double { 3.0 * radius * radius } }

@inline(never) func total(_ shapes: [any Shape]) -> Double { shapes.reduce(0) { $0 + $1.area() } }

@inline(never) func largest<T: Comparable>(_ values: [T]) -> T? { values.max() }

struct Odd: Error { let value: Int }
@inline(never) func checkEven(_ value: Int) throws -> Int {
  if value % 2 != 0 { throw Odd(value: value) }
  return value / 2
}

@inline(never) func triple(_ a: Int, _ b: Int, _ c: Int) -> (Int, Int, Int) { (c, b, a) }

@inline(never) func work(_ seed: Int) async -> Int {
  var x = seed
  for _ in 0..<1000 { x = (x &* 1103515245 &+ 12345) & 0x7fffffff }
  return x % 1000
}

@inline(never) func apply(_ values: [Int], _ f: (Int) -> Int) -> [Int] { values.map(f) }

@main struct Demo {
  static func main() async {
    let shapes: [any Shape] = [Square(side: 2), Circle(radius: 1), Square(side: 3)]
    print("area", total(shapes))
    print("largest", largest([3, 9, 4]) ?? 0, largest(["b", "a"]) ?? "")
    for value in [4, 7] {
      do { print("half", try checkEven(value)) } catch { print("odd", (error as? Odd)?.value ?? -1) }
    }
    let t = triple(1, 2, 3)
    print("triple", t.0, t.1, t.2)
    let offset = 10
    print("apply", apply([1, 2, 3]) { $0 * offset })
    let results = await withTaskGroup(of: Int.self) { group in
      for seed in 1...4 { group.addTask { await work(seed) } }
      var sum = 0
      for await value in group { sum += value }
      return sum
    }
    print("tasks", results)
  }
}
