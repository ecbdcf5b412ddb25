"""The raw-format readers on small fixture files written in each source's real format.

Every fixture has a broken line (an error naming file:line; with on_bad_line: skip, a counted drop),
a corrupt image (item kept, image null, counted) and a missing image.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from molar.config import DataParams, SplitParams
from molar.data.readers import amazon, movielens, pixelrec, recbole, sasrec_txt, user_seq
from molar.data.schema import BadInputError, IngestReport
from molar.data.split import build_split

ML1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"
ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def good_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format="JPEG")


def corrupt_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 this is not a JPEG")


def run(module, source: str, path: Path, on_bad_line: str = "skip") -> tuple[pl.DataFrame, pl.DataFrame, IngestReport]:
    report = IngestReport(source=source)
    cfg = DataParams(source=source, path=str(path), on_bad_line=on_bad_line)
    items, interactions = module.read(path, cfg, report)
    return items, interactions, report


def rows(interactions: pl.DataFrame) -> list[tuple]:
    return list(interactions.select("user_id", "item_id", "timestamp", "order").iter_rows())


def attrs(items: pl.DataFrame) -> dict[str, dict]:
    return {item_id: json.loads(a) for item_id, a in items.select("item_id", "attributes").iter_rows()}


def image_names(items: pl.DataFrame) -> dict[str, str | None]:
    return {i: (Path(p).name if p else None) for i, p in items.select("item_id", "image_path").iter_rows()}


# ------------------------------------------------------------------------------------- movielens
def ml1m_fixture(root: Path) -> Path:
    write(
        root / "ratings.dat",
        "1::10::5::978300760\n"
        "1::20::3::978300700\n"
        "2::10::4::978300800\n"
        "1::30::4::978300760\n"
        "2::30::4\n"  # line 5: no timestamp
        "2::20::1::978300900\n",
        "latin-1",
    )
    write(
        root / "movies.dat",
        "10::Toy Story (1995)::Animation|Children's|Comedy\n"
        "20::Café Society (1996)::Drama\n"
        "30::Heat (1995)::Action|Crime|Thriller\n"
        "40::Never Rated (2000)::Drama\n",
        "latin-1",
    )
    write(root / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    good_image(root / "posters" / "10.jpg")
    corrupt_image(root / "posters" / "20.jpg")  # 30 has no poster
    return root


def test_movielens_ml1m_tables(tmp_path):
    items, interactions, report = run(movielens, "movielens", ml1m_fixture(tmp_path))
    # per user by timestamp; user 1's tie at 978300760 keeps file order (10 before 30)
    assert rows(interactions) == [
        ("1", "20", 978300700, 0),
        ("1", "10", 978300760, 1),
        ("1", "30", 978300760, 2),
        ("2", "10", 978300800, 0),
        ("2", "20", 978300900, 1),
    ]
    assert items["item_id"].to_list() == ["10", "20", "30"]  # movies.dat order; 40 was never rated
    assert items["title"].to_list() == ["Toy Story", "Café Society", "Heat"]  # latin-1 decoded, year split off
    assert attrs(items)["10"] == {"genres": "Animation, Children's, Comedy", "year": 1995}
    assert items["description"][0] == "Toy Story is a 1995 film in the genres Animation, Children's and Comedy."
    assert items["description"][1] == "Café Society is a 1996 film in the genre Drama."
    assert image_names(items) == {"10": "10.jpg", "20": None, "30": None}
    assert report.rows_read == 6 and report.dropped == {"bad_line": 1}
    assert (report.items_with_image, report.items_without_image, report.bad_images) == (1, 2, 1)
    assert report.encodings == {"ratings.dat": "latin-1", "movies.dat": "latin-1"}


def test_movielens_bad_line_names_file_and_line(tmp_path):
    with pytest.raises(BadInputError, match=r"ratings\.dat:5: expected UserID::MovieID::Rating::Timestamp"):
        run(movielens, "movielens", ml1m_fixture(tmp_path), on_bad_line="error")


def test_movielens_missing_movie_file_is_named(tmp_path):
    ml1m_fixture(tmp_path)
    (tmp_path / "movies.dat").unlink()
    with pytest.raises(BadInputError, match=r"movies\.dat: file not found; expected the ml-1m movie file"):
        run(movielens, "movielens", tmp_path)


def test_movielens_no_ratings_file(tmp_path):
    with pytest.raises(BadInputError, match=r"ratings\.dat and movies\.dat \(ml-1m\) or u\.data"):
        run(movielens, "movielens", tmp_path)


def u_item_line(movie_id: int, title: str, date: str, genres: list[str]) -> str:
    flags = "|".join("1" if g in genres else "0" for g in ML100K_GENRES)
    return f"{movie_id}|{title}|{date}||http://us.imdb.com/M/title-exact?x|{flags}\n"


def test_movielens_ml100k_tables(tmp_path):
    write(tmp_path / "u.data", "7\t1\t3\t881250949\n7\t2\t5\t881250900\n8\t1\t4\n9\t2\t1\t891717742\n")  # line 3 broken
    write(tmp_path / "u.genre", "".join(f"{g}|{i}\n" for i, g in enumerate(ML100K_GENRES)) + "\n")
    write(
        tmp_path / "u.item",
        u_item_line(1, "Toy Story (1995)", "01-Jan-1995", ["Animation", "Children's", "Comedy"])
        + u_item_line(2, "Á köldum klaka (Cold Fever) (1994)", "", ["Comedy", "Drama"])
        + u_item_line(3, "unknown", "", ["unknown"]),
        "latin-1",
    )
    good_image(tmp_path / "posters" / "2.jpg")
    items, interactions, report = run(movielens, "movielens", tmp_path)
    assert rows(interactions) == [("7", "2", 881250900, 0), ("7", "1", 881250949, 1), ("9", "2", 891717742, 0)]
    assert items["item_id"].to_list() == ["1", "2"]
    assert items["title"].to_list() == ["Toy Story", "Á köldum klaka (Cold Fever)"]
    assert attrs(items) == {
        "1": {"genres": "Animation, Children's, Comedy", "year": 1995, "release_date": "01-Jan-1995"},
        "2": {"genres": "Comedy, Drama", "year": 1994},
    }
    assert image_names(items) == {"1": None, "2": "2.jpg"}
    assert report.rows_read == 4 and report.dropped == {"bad_line": 1}
    with pytest.raises(BadInputError, match=r"u\.data:3: expected 4 tab-separated fields"):
        run(movielens, "movielens", tmp_path, on_bad_line="error")


@pytest.mark.skipif(not ML100K.is_dir(), reason="real ml-100k not available")
def test_movielens_real_ml100k():
    items, interactions, report = run(movielens, "movielens", ML100K, on_bad_line="error")
    assert (interactions.height, interactions["user_id"].n_unique(), items.height) == (100_000, 943, 1682)
    assert report.rows_read == 100_000 and not report.dropped
    assert report.encodings["u.item"] == "latin-1"  # the GroupLens original: ISO-8859-1, not valid UTF-8
    assert items.filter(pl.col("title").str.contains("Ã")).height == 0


# ------------------------------------------------------------------------------------ sasrec-txt
def sasrec_fixture(root: Path) -> Path:
    write(root / "seq.txt", "1 5\n1 3\n2 3\noops\n1 7\n2 5 9\n2\t8\n")  # lines 4 and 6 broken
    write(root / "movies.dat", "3::Heat (1995)::Action|Crime\n5::Casino (1995)::Drama\n")
    good_image(root / "posters" / "5.jpg")
    corrupt_image(root / "posters" / "3.jpg")  # 7 and 8 have no poster
    return root


def test_sasrec_txt_tables(tmp_path):
    items, interactions, report = run(sasrec_txt, "sasrec-txt", sasrec_fixture(tmp_path))
    assert rows(interactions) == [
        ("1", "5", None, 0),
        ("1", "3", None, 1),
        ("1", "7", None, 2),
        ("2", "3", None, 0),
        ("2", "8", None, 1),
    ]
    # movies.dat order first, then items it lacks in order of first appearance, as placeholders
    assert items.select("item_id", "title", "description", "attributes").rows() == [
        ("3", "Heat", "Heat is a 1995 film in the genres Action and Crime.", '{"genres": "Action, Crime", "year": 1995}'),
        ("5", "Casino", "Casino is a 1995 film in the genre Drama.", '{"genres": "Drama", "year": 1995}'),
        ("7", "item 7", "", "{}"),
        ("8", "item 8", "", "{}"),
    ]
    assert image_names(items) == {"3": None, "5": "5.jpg", "7": None, "8": None}
    assert report.rows_read == 7 and report.dropped == {"bad_line": 2}
    assert (report.items_with_image, report.items_without_image, report.bad_images) == (1, 3, 1)


def test_sasrec_txt_file_path_and_errors(tmp_path):
    sasrec_fixture(tmp_path)
    items, interactions, _ = run(sasrec_txt, "sasrec-txt", tmp_path / "seq.txt")  # the file itself works too
    assert interactions.height == 5 and items.height == 4
    with pytest.raises(BadInputError, match=r"seq\.txt:4: expected two whitespace-separated integer ids"):
        run(sasrec_txt, "sasrec-txt", tmp_path, on_bad_line="error")
    write(tmp_path / "other.txt", "1 2\n")
    with pytest.raises(BadInputError, match=r"exactly one \.txt file .*found other\.txt, seq\.txt"):
        run(sasrec_txt, "sasrec-txt", tmp_path)


def test_sasrec_txt_without_content_and_empty(tmp_path):
    write(tmp_path / "a" / "data.txt", "4 9\r\n4 9\r\n")  # CRLF; a repeat without time is kept
    items, interactions, report = run(sasrec_txt, "sasrec-txt", tmp_path / "a")
    assert rows(interactions) == [("4", "9", None, 0), ("4", "9", None, 1)]
    assert items.rows() == [("9", "item 9", "", "{}", None)]
    assert report.items_without_image == 1 and report.bad_images == 0
    write(tmp_path / "b" / "data.txt", "\n")
    with pytest.raises(BadInputError, match="no interactions were read"):
        run(sasrec_txt, "sasrec-txt", tmp_path / "b")
    # every line skipped: the error says so and shows the first skipped line
    write(tmp_path / "c" / "data.txt", "a b\nc d\n")
    with pytest.raises(
        BadInputError,
        match=r"no interactions were read: data\.on_bad_line: skip dropped them all \(2 bad_line\); "
        r"the first skipped line: .*data\.txt:1: expected two whitespace-separated integer ids",
    ):
        run(sasrec_txt, "sasrec-txt", tmp_path / "c")


def test_sasrec_txt_undecodable_line(tmp_path):
    (tmp_path / "data.txt").write_bytes(b"1 2\n\xff\xfe 3\n1 4\n")
    with pytest.raises(BadInputError, match=r"data\.txt:2: expected utf-8 text"):
        run(sasrec_txt, "sasrec-txt", tmp_path, on_bad_line="error")
    _, interactions, report = run(sasrec_txt, "sasrec-txt", tmp_path)
    assert rows(interactions) == [("1", "2", None, 0), ("1", "4", None, 1)]
    assert report.rows_read == 3 and report.dropped == {"bad_line": 1}


@pytest.mark.skipif(not ML1M.is_dir(), reason="real ml-1m not available")
def test_sasrec_txt_real_ml1m():
    start = time.perf_counter()
    items, interactions, report = run(sasrec_txt, "sasrec-txt", ML1M, on_bad_line="error")
    elapsed = time.perf_counter() - start
    # counts from ../shared/data/ml-1m/SOURCE.md
    assert (interactions.height, interactions["user_id"].n_unique(), items.height) == (988_555, 6040, 3416)
    assert report.rows_read == 988_555 and not report.dropped
    assert report.encodings == {"ml-1m.txt": "utf-8", "movies.dat": "latin-1"}
    assert rows(interactions.head(2)) == [("1", "3186", None, 0), ("1", "1270", None, 1)]  # first lines of ml-1m.txt
    assert items.filter(pl.col("title").str.starts_with("item ")).height == 0  # all 3,416 are in movies.dat
    # some of the 11 poster-less movies occur; no poster is undecodable (3575.jpg is PNG data)
    assert report.bad_images == 0 and report.items_with_image + report.items_without_image == 3416
    assert 0 < report.items_without_image <= 11
    assert elapsed < 30, f"reading ml-1m.txt took {elapsed:.1f}s"


# --------------------------------------------------------------------------------------- recbole
def recbole_fixture(root: Path) -> Path:
    folder = root / "shop"
    write(
        folder / "shop.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ta\t5\t300\n"
        "u1\tb\t4\t100.0\n"
        "u2\ta\t3\t200\n"
        "u2\tb\t2\t\n"  # line 5: empty timestamp
        "u2\tc\t1\t150\n",
    )
    write(
        folder / "shop.item",
        "item_id:token\ttitle:token_seq\tprice:float\tcategories:token_seq\tdescription:token_seq\n"
        "a\tRed Mug\t9.5\tKitchen Mugs\tA red mug.\n"
        "b\tBlue Lamp\t20\tHome Lighting\t\n"
        "c\tGreen Shirt\t\tClothing\tSoft cotton.\n"
        "d\tNever Bought\t1\tMisc\t\n",
    )
    good_image(folder / "images" / "a.jpg")
    corrupt_image(folder / "images" / "b.jpg")  # c has no image
    return folder


def test_recbole_tables(tmp_path):
    items, interactions, report = run(recbole, "recbole", recbole_fixture(tmp_path))
    assert rows(interactions) == [("u1", "b", 100, 0), ("u1", "a", 300, 1), ("u2", "c", 150, 0), ("u2", "a", 200, 1)]
    assert items.select("item_id", "title", "description").rows() == [
        ("a", "Red Mug", "A red mug."),
        ("b", "Blue Lamp", ""),
        ("c", "Green Shirt", "Soft cotton."),
    ]
    assert attrs(items) == {
        "a": {"price": 9.5, "categories": "Kitchen Mugs"},
        "b": {"price": 20, "categories": "Home Lighting"},
        "c": {"categories": "Clothing"},
    }
    assert image_names(items) == {"a": "a.jpg", "b": None, "c": None}
    assert report.rows_read == 5 and report.dropped == {"bad_line": 1}
    assert (report.items_with_image, report.items_without_image, report.bad_images) == (1, 2, 1)
    with pytest.raises(BadInputError, match=r"shop\.inter:5: expected 4 tab-separated fields .* numeric timestamp"):
        run(recbole, "recbole", tmp_path / "shop", on_bad_line="error")


def test_recbole_without_item_file_or_timestamp(tmp_path):
    write(tmp_path / "x.inter", "user_id:token\titem_id:token\n7\t1\n7\t2\n8\t2\n")
    items, interactions, _ = run(recbole, "recbole", tmp_path)
    assert rows(interactions) == [("7", "1", None, 0), ("7", "2", None, 1), ("8", "2", None, 0)]
    assert items.select("item_id", "title", "attributes").rows() == [("1", "item 1", "{}"), ("2", "item 2", "{}")]


def test_recbole_header_errors(tmp_path):
    write(tmp_path / "x.inter", "user_id\titem_id\n7\t1\n")
    with pytest.raises(BadInputError, match=r"x\.inter:1: expected a header of tab-separated name:type"):
        run(recbole, "recbole", tmp_path)
    write(tmp_path / "x.inter", "uid:token\titem_id:token\n7\t1\n")
    with pytest.raises(BadInputError, match=r"x\.inter:1: .*including user_id:token, item_id:token"):
        run(recbole, "recbole", tmp_path)
    (tmp_path / "x.inter").unlink()
    with pytest.raises(BadInputError, match=r"<name>\.inter.*found none"):
        run(recbole, "recbole", tmp_path)


# ---------------------------------------------------------------------------------------- amazon
REVIEWS = [
    {"overall": 5.0, "verified": True, "reviewTime": "01 2, 2015", "reviewerID": "A1", "asin": "B001",
     "reviewerName": "Ann", "reviewText": "Great.", "summary": "Five Stars", "unixReviewTime": 1420156800},
    {"overall": 4.0, "reviewerID": "A1", "asin": "B002", "style": {"Platform:": " Wii"}, "unixReviewTime": 1420070400},
    {"overall": 3.0, "reviewerID": "A2", "asin": "B001", "unixReviewTime": 1420243200, "vote": "2"},
    '{"reviewerID": "A2", "asin": "B00',  # line 4: cut off
    {"overall": 1.0, "reviewerID": "A2", "asin": "B003", "unixReviewTime": 1420070400},
]  # fmt: skip
META = [
    {"category": ["Video Games", "Wii", "Games"], "tech1": "", "description": ["<b>Race</b> &amp; jump.", "For all ages."],
     "fit": "", "title": "Mario &amp; Sonic", "also_buy": ["B001"], "brand": "Nintendo", "feature": ["Fun", "Fast"],
     "rank": "1,234 in Video Games", "main_cat": "Video Games", "price": "$19.99", "asin": "B002",
     "imageURL": ["https://images-na.ssl-images-amazon.com/images/I/41abc._SS40_.jpg"],
     "imageURLHighRes": ["https://images-na.ssl-images-amazon.com/images/I/41abc.jpg"]},
    {"title": "Zelda", "description": "An adventure.", "brand": "Nintendo", "category": [], "asin": "B001",
     "imageURL": [], "imageURLHighRes": []},
    "not json at all",  # line 3
    {"title": "Tetris", "asin": "B003", "price": ""},
    {"title": "Never Reviewed", "asin": "B009"},
    {"title": "Zelda (second record)", "asin": "B001"},
]  # fmt: skip


def write_json_lines(path: Path, records: list) -> None:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())


def amazon_fixture(root: Path) -> Path:
    write_json_lines(root / "Video_Games_5.json.gz", REVIEWS)
    write_json_lines(root / "meta_Video_Games.json.gz", META)
    good_image(root / "images" / "41abc.jpg")  # named after the high-res URL of B002
    corrupt_image(root / "images" / "B001.jpg")  # B003 has no image
    return root


def test_amazon_tables(tmp_path):
    items, interactions, report = run(amazon, "amazon", amazon_fixture(tmp_path))
    assert rows(interactions) == [
        ("A1", "B002", 1420070400, 0),
        ("A1", "B001", 1420156800, 1),
        ("A2", "B003", 1420070400, 0),
        ("A2", "B001", 1420243200, 1),
    ]
    assert items.select("item_id", "title", "description").rows() == [
        ("B002", "Mario & Sonic", "Race & jump. For all ages."),
        ("B001", "Zelda", "An adventure."),
        ("B003", "Tetris", ""),
    ]
    assert attrs(items) == {
        "B002": {"brand": "Nintendo", "price": "$19.99", "category": "Video Games > Wii > Games",
                 "main_cat": "Video Games", "features": "Fun; Fast"},
        "B001": {"brand": "Nintendo"},
        "B003": {},
    }  # fmt: skip
    assert image_names(items) == {"B002": "41abc.jpg", "B001": None, "B003": None}
    assert report.rows_read == 5 and report.dropped == {"bad_line": 2}  # one review line, one metadata line
    assert (report.items_with_image, report.items_without_image, report.bad_images) == (1, 2, 1)


def test_amazon_errors_and_fast_path(tmp_path):
    amazon_fixture(tmp_path)
    with pytest.raises(BadInputError, match=r"Video_Games_5\.json\.gz:4: expected a JSON object with string reviewerID"):
        run(amazon, "amazon", tmp_path, on_bad_line="error")
    # without broken lines the vectorised path reads the same table as the line-by-line one
    write_json_lines(tmp_path / "Video_Games_5.json.gz", [r for r in REVIEWS if not isinstance(r, str)])
    write_json_lines(tmp_path / "meta_Video_Games.json.gz", [m for m in META if not isinstance(m, str)])
    assert amazon._reviews_fast(tmp_path / "Video_Games_5.json.gz") is not None
    items, interactions, report = run(amazon, "amazon", tmp_path, on_bad_line="error")
    assert rows(interactions) == rows(run(amazon, "amazon", amazon_fixture(tmp_path))[1])
    assert items["item_id"].to_list() == ["B002", "B001", "B003"] and not report.dropped
    # a review without its time is a bad line in the vectorised path too
    write_json_lines(tmp_path / "Video_Games_5.json.gz", [{"reviewerID": "A9", "asin": "B001"}])
    with pytest.raises(BadInputError, match=r"Video_Games_5\.json\.gz:1: .*integer unixReviewTime"):
        run(amazon, "amazon", tmp_path, on_bad_line="error")
    (tmp_path / "meta_Video_Games.json.gz").unlink()
    with pytest.raises(BadInputError, match=r"exactly one Amazon metadata \(meta_<Category>\.json\[\.gz\]\) file .*found none"):
        run(amazon, "amazon", tmp_path)


def test_amazon_2014_metadata_literals(tmp_path):
    write_json_lines(tmp_path / "reviews_Books_5.json", [{"reviewerID": "R", "asin": "0007", "unixReviewTime": 5}])
    meta = (
        "{'asin': '0007', 'title': 'Psalms', 'categories': [['Books'], ['Books', 'Religion']], 'price': 13.79, "
        "'imUrl': 'http://ecx.images-amazon.com/images/I/31W9.jpg'}"
    )
    write(tmp_path / "meta_Books.json", meta + "\n")
    good_image(tmp_path / "images" / "31W9.jpg")
    items, _, _ = run(amazon, "amazon", tmp_path, on_bad_line="error")
    assert items.rows() == [
        ("0007", "Psalms", "", '{"category": "Books; Books > Religion", "price": "13.79"}', str(tmp_path / "images" / "31W9.jpg"))
    ]


# -------------------------------------------------------------------------------------- pixelrec
ITEM_HEADER = (
    "item_id,view_number,comment_number,thumbup_number,share_number,coin_number,favorite_number,barrage_number,"
    "title_en,title,description,tag"
)  # Pixel200K's item_info.csv columns


def pixelrec_fixture(root: Path, header: str = "item_id,user_id,timestamp") -> Path:
    names = header.split(",")
    records = [
        {"item_id": "i1", "user_id": "u1", "timestamp": "1600000300"},
        {"item_id": "i2", "user_id": "u1", "timestamp": "1600000100"},
        {"item_id": "i1", "user_id": "u2", "timestamp": "1600000200"},
        {"item_id": "i3", "user_id": "u2", "timestamp": "soon"},  # line 5
        {"item_id": "i3", "user_id": "u2", "timestamp": "1600000250"},
    ]
    write(root / "dataset" / "Pixel200K.csv", header + "\n" + "".join(",".join(r[n] for n in names) + "\n" for r in records))
    write(
        root / "information" / "Pixel200K.csv",
        ITEM_HEADER + "\n"
        '"i1",120,2,10,1,0,3,5,Cat video,猫咪视频,"A cat, playing\nwith yarn",pets\n'  # record spans lines 2-3
        "i2,50,0,4,0,0,1,0,Noodles,做饭,Quick noodles,food\n"
        "i5,1,2\n"  # line 5: too few fields
        "i3,7,0,0,0,0,0,0,,舞蹈,,dance\n"
        "i4,1,0,0,0,0,0,0,Unwatched,无人看,,misc\n",
    )
    good_image(root / "cover" / "i1.jpg")
    corrupt_image(root / "cover" / "i2.jpg")  # i3 has no cover
    return root


def test_pixelrec_tables(tmp_path):
    items, interactions, report = run(pixelrec, "pixelrec", pixelrec_fixture(tmp_path))
    assert rows(interactions) == [
        ("u1", "i2", 1600000100, 0),
        ("u1", "i1", 1600000300, 1),
        ("u2", "i1", 1600000200, 0),
        ("u2", "i3", 1600000250, 1),
    ]
    assert items.select("item_id", "title", "description").rows() == [
        ("i1", "猫咪视频", "A cat, playing\nwith yarn"),
        ("i2", "做饭", "Quick noodles"),
        ("i3", "舞蹈", ""),
    ]
    assert attrs(items)["i1"] == {
        "view_number": 120, "comment_number": 2, "thumbup_number": 10, "share_number": 1, "coin_number": 0,
        "favorite_number": 3, "barrage_number": 5, "title_en": "Cat video", "tag": "pets",
    }  # fmt: skip
    assert attrs(items)["i3"]["tag"] == "dance" and "title_en" not in attrs(items)["i3"]
    assert image_names(items) == {"i1": "i1.jpg", "i2": None, "i3": None}
    assert report.rows_read == 5 and report.dropped == {"bad_line": 2}  # one interaction line, one item record
    assert (report.items_with_image, report.items_without_image, report.bad_images) == (1, 2, 1)


def test_pixelrec_column_order_and_errors(tmp_path):
    reordered = run(pixelrec, "pixelrec", pixelrec_fixture(tmp_path / "b", "user_id,timestamp,item_id"))[1]
    assert rows(reordered) == rows(run(pixelrec, "pixelrec", pixelrec_fixture(tmp_path / "a"))[1])
    with pytest.raises(BadInputError, match=r"dataset/Pixel200K\.csv:5: expected 3 comma-separated fields .*integer timestamp"):
        run(pixelrec, "pixelrec", tmp_path / "a", on_bad_line="error")
    inter = tmp_path / "a" / "dataset" / "Pixel200K.csv"
    inter.write_text("".join(line for line in inter.read_text().splitlines(keepends=True) if "soon" not in line))
    with pytest.raises(BadInputError, match=r"information/Pixel200K\.csv:5: expected 12 comma-separated fields"):
        run(pixelrec, "pixelrec", tmp_path / "a", on_bad_line="error")
    (tmp_path / "a" / "information" / "Pixel200K.csv").unlink()
    with pytest.raises(BadInputError, match=r"item-information CSV .*found none"):
        run(pixelrec, "pixelrec", tmp_path / "a")


# ---------------------------------------------------------------- movielens: encodings, skipped item lines
def test_movielens_utf8_copies_are_read_as_utf8(tmp_path):
    ml1m_fixture(tmp_path)
    (tmp_path / "movies.dat").write_bytes((tmp_path / "movies.dat").read_bytes().decode("latin-1").encode("utf-8"))
    items, _, report = run(movielens, "movielens", tmp_path)
    assert items["title"].to_list() == ["Toy Story", "Café Society", "Heat"]  # not "CafÃ© Society"
    assert report.encodings == {"ratings.dat": "latin-1", "movies.dat": "utf-8"}


def ml100k_fixture(root: Path, u_item_encoding: str = "latin-1") -> Path:
    write(root / "u.data", "7\t1\t3\t881250949\n7\t2\t5\t881250900\n8\t2\t4\t881250901\n9\t3\t1\t891717742\n")
    write(root / "u.genre", "".join(f"{g}|{i}\n" for i, g in enumerate(ML100K_GENRES)))
    write(
        root / "u.item",
        u_item_line(1, "Toy Story (1995)", "01-Jan-1995", ["Animation"])
        + u_item_line(2, "Café Society (1996)", "", ["Drama"])
        + u_item_line(3, "Heat (1995)", "", ["Action"]),
        u_item_encoding,
    )
    return root


def test_movielens_ml100k_utf8_u_item(tmp_path):
    items, _, report = run(movielens, "movielens", ml100k_fixture(tmp_path, "utf-8"), on_bad_line="error")
    assert items["title"].to_list() == ["Toy Story", "Café Society", "Heat"]
    assert report.encodings == {"u.data": "latin-1", "u.genre": "latin-1", "u.item": "utf-8"}
    items, _, report = run(movielens, "movielens", ml100k_fixture(tmp_path / "l1"), on_bad_line="error")
    assert items["title"][1] == "Café Society" and report.encodings["u.item"] == "latin-1"


def test_movielens_skipped_item_line_drops_its_ratings_as_such(tmp_path):
    ml100k_fixture(tmp_path)
    u_item = (tmp_path / "u.item").read_bytes().decode("latin-1").splitlines(keepends=True)
    u_item[1] = "2|Café Society (1996)|broken\n"  # too few fields: movie 2's line is skipped
    write(tmp_path / "u.item", "".join(u_item), "latin-1")
    items, interactions, report = run(movielens, "movielens", tmp_path)
    assert items["item_id"].to_list() == ["1", "3"]
    assert rows(interactions) == [("7", "1", 881250949, 0), ("9", "3", 891717742, 0)]
    # movie 2's two ratings: dropped because its line was skipped, not as unknown items
    assert report.dropped == {"bad_line": 1, "item_line_skipped": 2}
    with pytest.raises(BadInputError, match=r"u\.item:2: expected 24 \|-separated fields"):
        run(movielens, "movielens", tmp_path, on_bad_line="error")


def test_movies_dat_skipped_line_drops_ratings_not_placeholders(tmp_path):
    sasrec_fixture(tmp_path)
    write(tmp_path / "movies.dat", "3::Heat (1995)\n5::Casino (1995)::Drama\n5::Casino again::Drama\n")
    items, interactions, report = run(sasrec_txt, "sasrec-txt", tmp_path)
    # 3's line lacks genres: its two interactions go; the repeated 5 keeps its first line
    assert items["item_id"].to_list() == ["5", "7", "8"] and items["title"][0] == "Casino"
    assert rows(interactions) == [("1", "5", None, 0), ("1", "7", None, 1), ("2", "8", None, 0)]
    assert report.dropped == {"bad_line": 4, "item_line_skipped": 2}


# -------------------------------------------------------------------------------------- user-seq
def test_user_seq_tables(tmp_path):
    write(tmp_path / "Beauty.txt", "1 5 3 7\nu2 x9 x3\nlonely\n1 8\n")  # line 3: no items; line 4: user 1 again
    write(tmp_path / "movies.dat", "3::Heat (1995)::Action\n")
    items, interactions, report = run(user_seq, "user-seq", tmp_path)
    assert rows(interactions) == [
        ("1", "5", None, 0),
        ("1", "3", None, 1),
        ("1", "7", None, 2),
        ("u2", "x9", None, 0),
        ("u2", "x3", None, 1),
    ]
    assert items.select("item_id", "title").rows() == [
        ("3", "Heat"), ("5", "item 5"), ("7", "item 7"), ("x9", "item x9"), ("x3", "item x3"),
    ]  # fmt: skip
    assert report.rows_read == 4 and report.dropped == {"bad_line": 2}
    with pytest.raises(BadInputError, match=r"Beauty\.txt:3: expected a user id followed by that user's item ids"):
        run(user_seq, "user-seq", tmp_path, on_bad_line="error")
    write(tmp_path / "Beauty.txt", "1 5 3 7\nu2 x9 x3\n")
    _, interactions, report = run(user_seq, "user-seq", tmp_path / "Beauty.txt", on_bad_line="error")
    assert interactions.height == 5 and not report.dropped


def test_sasrec_txt_points_one_line_per_user_files_to_user_seq(tmp_path):
    write(tmp_path / "Beauty.txt", "1 5 3 7\n2 3 9\n3 4\n")
    for on_bad_line in ("error", "skip"):  # skipping would drop nearly everything: stop either way
        with pytest.raises(
            BadInputError,
            match=r"Beauty\.txt: 2 of 3 lines have more than two fields \(line 1: '1 5 3 7'\); this looks like the "
            r"one-line-per-user format 'user item item \.\.\.': set data\.source: user-seq",
        ):
            run(sasrec_txt, "sasrec-txt", tmp_path, on_bad_line=on_bad_line)
    # a stray long line in a pair file is a bad line whose advice names the other format too
    write(tmp_path / "Beauty.txt", "1 5\n1 3 9\n2 4\n")
    with pytest.raises(BadInputError, match=r"Beauty\.txt:2: expected two .*is read by data\.source: user-seq"):
        run(sasrec_txt, "sasrec-txt", tmp_path, on_bad_line="error")


# -------------------------------------------------------------------------- recbole pre-split files
SPLIT_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
SEQUENCES = {"0": ["1", "2", "3", "4", "5", "6", "7"], "1": ["7", "8", "9", "7"], "2": ["2", "3", "4"]}


def unisrec_files(folder: Path, sequences: dict[str, list[str]], longest: int = 3) -> Path:
    """The three files as UniSRec's convert_to_atomic_files writes them: leave-one-out, train rows newest
    first, every history cut to its last ``longest`` items."""
    train = valid = test = SPLIT_HEADER
    for user, s in sequences.items():
        for k in range(len(s) - 3, 0, -1):
            train += f"{user}\t{' '.join(s[:k][-longest:])}\t{s[k]}\n"
        valid += f"{user}\t{' '.join(s[:-2][-longest:])}\t{s[-2]}\n"
        test += f"{user}\t{' '.join(s[:-1][-longest:])}\t{s[-1]}\n"
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        write(folder / f"{folder.name}.{split}.inter", text)
    return folder


def sequences_of(interactions: pl.DataFrame) -> dict[str, list[str]]:
    return dict(interactions.group_by("user_id", maintain_order=True).agg("item_id").rows())


def test_recbole_pre_split_sequences_are_rebuilt(tmp_path):
    folder = unisrec_files(tmp_path / "Scientific", SEQUENCES)
    assert (folder / "Scientific.train.inter").read_text().splitlines()[1:4] == ["0\t2 3 4\t5", "0\t1 2 3\t4", "0\t1 2\t3"]
    write(folder / "Scientific.text", "item_id:token\ttext:token_seq\nB7\tMicroscope Lab Zeiss\nB2\tBeaker set\n")
    write(folder / "Scientific.item2index", "B7\t7\nB2\t2\n")
    items, interactions, report = run(recbole, "recbole", folder, on_bad_line="error")
    assert sequences_of(interactions) == SEQUENCES
    assert rows(interactions)[:2] == [("0", "1", None, 0), ("0", "2", None, 1)]
    assert items.select("item_id", "title", "description", "attributes").rows() == [
        ("7", "Microscope Lab Zeiss", "", "{}"),
        ("2", "Beaker set", "", "{}"),
    ]
    assert report.rows_read == 4 + 1 + 0 + 3 * 2 and not report.dropped  # train rows + valid + test rows
    # the split stage's leave-one-out gives back the files' own valid and test rows
    all_items = pl.DataFrame({"item_id": [str(i) for i in range(1, 10)]}).with_columns(
        title=pl.col("item_id"), description=pl.lit(""), attributes=pl.lit("{}"), image_path=pl.lit(None, pl.String)
    )
    tables, _ = build_split(all_items, interactions, SplitParams())
    item_of = dict(tables["items"].select("item_idx", "item_id").iter_rows())
    for split in ("valid", "test"):
        ours = [(item_of[t], [item_of[i] for i in h][-3:]) for h, t in tables[split].select("history", "target").iter_rows()]
        lines = (folder / f"Scientific.{split}.inter").read_text().splitlines()[1:]
        assert ours == [(line.split("\t")[2], line.split("\t")[1].split()) for line in lines]


def test_recbole_pre_split_inconsistent_files(tmp_path):
    folder = unisrec_files(tmp_path / "Sci", SEQUENCES)
    test_file = folder / "Sci.test.inter"
    # user 1's test history no longer extends its valid row (7 8 -> 9)
    write(test_file, test_file.read_text().replace("1\t7 8 9\t7", "1\t7 8 8\t7"))
    with pytest.raises(
        BadInputError,
        match=r"Sci\.test\.inter:3: user '1': item_id_list '7 8 8' does not continue the sequence of the user's "
        r"earlier rows \(expected '7 8 9' before item '7'\); the train, valid and test files must be one "
        r"leave-one-out split .* data\.on_bad_line: skip",
    ):
        run(recbole, "recbole", folder, on_bad_line="error")
    _, interactions, report = run(recbole, "recbole", folder)
    assert sequences_of(interactions) == {"0": SEQUENCES["0"], "2": SEQUENCES["2"]}
    assert report.dropped == {"inconsistent_sequence": 3}  # user 1's train, valid and test rows
    # a user without a test row
    write(test_file, SPLIT_HEADER + "0\t4 5 6\t7\n")
    with pytest.raises(BadInputError, match=r"Sci\.test\.inter: user '1' has 0 rows; expected one"):
        run(recbole, "recbole", folder, on_bad_line="error")


def test_recbole_pre_split_needs_all_three_files(tmp_path):
    folder = unisrec_files(tmp_path / "Sci", SEQUENCES)
    (folder / "Sci.valid.inter").unlink()
    (folder / "Sci.test.inter").unlink()
    with pytest.raises(
        BadInputError, match=r"Sci\.train\.inter found, but not Sci\.valid\.inter, Sci\.test\.inter: .*add the missing files"
    ):
        run(recbole, "recbole", folder)


def test_recbole_plain_reader_never_misreads_sequences(tmp_path):
    write(tmp_path / "x.inter", SPLIT_HEADER + "0\t1 2\t3\n")
    with pytest.raises(
        BadInputError,
        match=r"x\.inter:1: column 'item_id_list:token_seq' holds item histories: this is one of RecBole's pre-split "
        r"benchmark files .* name the files <name>\.train\.inter, <name>\.valid\.inter and <name>\.test\.inter",
    ):
        run(recbole, "recbole", tmp_path)
    write(tmp_path / "x.inter", "user_id:token\titem_id:token_seq\n0\t1 2\n")
    with pytest.raises(
        BadInputError,
        match=r"x\.inter:1: column 'item_id:token_seq' cannot be read: this reader needs item_id:token there, and a "
        r"token_seq column holds a list of values per line; fix the header to declare item_id:token",
    ):
        run(recbole, "recbole", tmp_path)


def test_recbole_skipped_item_line(tmp_path):
    folder = recbole_fixture(tmp_path)
    item_file = folder / "shop.item"
    write(item_file, item_file.read_text().replace("c\tGreen Shirt\t\tClothing\tSoft cotton.", "c\tGreen Shirt\tcheap\tClothing\t"))
    items, interactions, report = run(recbole, "recbole", folder)
    assert items["item_id"].to_list() == ["a", "b"] and ("u2", "c", 150, 0) not in rows(interactions)
    assert report.dropped == {"bad_line": 2, "item_line_skipped": 1}


# ------------------------------------------------------------------------ amazon, pixelrec: named fields, skipped items
@pytest.mark.parametrize(
    "review, problem",
    [
        ({"reviewerID": "A9", "asin": "B001"}, "unixReviewTime is missing"),
        ({"reviewerID": "A9", "asin": "B001", "unixReviewTime": "01 2, 2015"}, 'unixReviewTime is "01 2, 2015", not an integer'),
        ({"asin": "B001", "unixReviewTime": 5}, "reviewerID is missing"),
        ({"reviewerID": "", "asin": "B001", "unixReviewTime": 5}, 'reviewerID is "", not a non-empty string'),
        ('{"reviewerID": "A2", "asin": "B00', "not valid JSON"),
        ("[1, 2]", "a JSON list, not an object"),
    ],
)  # fmt: skip
def test_amazon_bad_review_names_the_field(tmp_path, review, problem):
    amazon_fixture(tmp_path)
    write_json_lines(tmp_path / "Video_Games_5.json.gz", [REVIEWS[0], review])
    with pytest.raises(BadInputError, match=r"Video_Games_5\.json\.gz:2: expected a JSON object .*: " + re.escape(problem)):
        run(amazon, "amazon", tmp_path, on_bad_line="error")


def test_amazon_skipped_metadata_line(tmp_path):
    amazon_fixture(tmp_path)
    meta = [m for m in META if not isinstance(m, str)]
    meta[2] = '{"title": "Tetris", "asin": "B003", "price": '  # cut off: B003's only record
    write_json_lines(tmp_path / "meta_Video_Games.json.gz", meta)
    items, interactions, report = run(amazon, "amazon", tmp_path)
    assert items["item_id"].to_list() == ["B002", "B001"]
    assert ("A2", "B003", 1420070400, 0) not in rows(interactions)
    assert report.dropped == {"bad_line": 2, "item_line_skipped": 1}  # the cut-off review and B003's record


def test_pixelrec_skipped_item_record(tmp_path):
    pixelrec_fixture(tmp_path)
    info = tmp_path / "information" / "Pixel200K.csv"
    write(info, info.read_text().replace("i3,7,0,0,0,0,0,0,,舞蹈,,dance", "i3,7,0,舞蹈"))
    items, interactions, report = run(pixelrec, "pixelrec", tmp_path)
    assert items["item_id"].to_list() == ["i1", "i2"] and len(rows(interactions)) == 3
    assert report.dropped == {"bad_line": 3, "item_line_skipped": 1}


def test_no_interactions_left_names_what_dropped_them():
    # every interaction named an item the item file lacks: the message says so, not "none read"
    from molar.data.schema import IngestReport, make_interactions, make_items, validate

    report = IngestReport(source="movielens")
    report.dropped["unknown_item"] += 3
    items = make_items([{"item_id": "1", "title": "t", "description": "", "attributes": "{}", "image_path": None}])
    empty = make_interactions([("u", "1", 1)]).head(0)
    with pytest.raises(BadInputError, match=r"no interactions are left after dropping 3 unknown_item"):
        validate(items, empty, "movielens", report)
