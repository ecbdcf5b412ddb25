"""The raw-format readers on small fixture files written in each source's real format.

Every fixture has a broken line (an error naming file:line; with on_bad_line: skip, a counted drop),
a corrupt image (item kept, image null, counted) and a missing image.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from molar.config import DataParams
from molar.data.readers import amazon, movielens, pixelrec, recbole, sasrec_txt
from molar.data.schema import BadInputError, IngestReport

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
